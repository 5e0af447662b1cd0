"""The chat footer says how many prompt tokens a turn actually evaluated (a hybrid model resumes
from its last checkpoint; any model reuses its cached prefix)."""
from app.chat_controller import reply_stats
from app.models.chat import format_stats
from engine.run.generate import GenerationEvent


def test_footer_shows_the_evaluated_prompt_tokens():
    event = GenerationEvent("", 7, prompt_tokens=412, prompt_tps=95.0, generation_tokens=12, generation_tps=8.0,
                            context_used=424, finish_reason="stop", prompt_evaluated=23)
    stats = reply_stats(event, "stop")
    assert stats["prompt_evaluated"] == 23
    assert "prompt 412 tokens (23 evaluated, the rest cached) at 95 tok/s" in format_stats(stats)


def test_footer_is_unchanged_when_the_whole_prompt_was_evaluated():
    stats = {"prompt_tokens": 52, "prompt_evaluated": 52, "prompt_tps": 812.0}
    assert format_stats(stats) == "prompt 52 tokens at 812 tok/s"

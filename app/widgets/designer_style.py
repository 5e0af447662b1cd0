"""The designer's own style sheet: the controls it adds to the app's dark theme (resources/style.qss)."""

DESIGNER_QSS = """
QLabel#designerTitle {
    font-size: 14pt;
    font-weight: 600;
    color: #f2f3f5;
}
QWidget#designerPanel QLabel#fieldLabel { color: #9a9ea8; }
QWidget#designerPanel QLabel#sectionTitle {
    font-size: 10.5pt;
    font-weight: 600;
    color: #c8cbd2;
}
QLabel#explanationLabel {
    color: #c9d6f2;
    background: rgba(91, 141, 239, 0.10);
    border: 1px solid rgba(91, 141, 239, 0.30);
    border-radius: 6px;
    padding: 6px 10px;
}
QLabel#verdictLabel { font-weight: 600; padding: 2px 0; }
QLabel#verdictLabel[fits="true"] { color: #7fd19b; }
QLabel#verdictLabel[fits="false"] { color: #ff6b70; }
QLabel#designerNotice {
    color: #f2c879;
    background: rgba(230, 162, 60, 0.08);
    border: 1px solid rgba(230, 162, 60, 0.35);
    border-radius: 6px;
    padding: 6px 10px;
}
QLabel#oursOnlyBadge {
    color: #f5c451;
    background: rgba(245, 196, 81, 0.12);
    border: 1px solid rgba(245, 196, 81, 0.45);
    border-radius: 9px;
    padding: 1px 10px;
    font-size: 8.5pt;
    font-weight: 600;
}
QLabel#commandStatus[level="error"] { color: #ff6b70; }
QLabel#commandStatus[level="warning"] { color: #f2c879; }
QLabel#commandStatus[level="note"] { color: #9fbcff; }
QLabel#commandStatus[level="muted"] { color: #9a9ea8; }
QPushButton#autoFitButton {
    background: #3d6fd9;
    border: 1px solid #4a7be3;
    color: #ffffff;
    font-weight: 600;
    padding: 6px 20px;
}
QPushButton#autoFitButton:hover { background: #4a7be3; }
QPushButton#addGpuButton {
    background: transparent;
    border: 1px dashed #4a4e57;
    color: #9fbcff;
    padding: 6px 10px;
}
QPushButton#addGpuButton:hover { border-color: #5b8def; background: rgba(91, 141, 239, 0.08); }
QToolButton#designerTool {
    background: #2b2d33;
    border: 1px solid #3a3d44;
    border-radius: 6px;
    padding: 4px 12px;
}
QToolButton#designerTool:hover { background: #34363d; }
QToolButton#designerTool:disabled { color: #6b6f78; background: #25272c; border-color: #2f3137; }
QPlainTextEdit#commandLine {
    background: #17181b;
    border: 1px solid #34363d;
    border-radius: 6px;
    padding: 4px 6px;
    color: #e6e8ec;
    selection-background-color: #3d6fd9;
}
QPlainTextEdit#commandLine:focus { border: 1px solid #5b8def; }
QWidget#designerPanel QCheckBox { color: #c8cbd2; spacing: 6px; }
QWidget#designerPanel QCheckBox::indicator {
    width: 13px;
    height: 13px;
    border: 1px solid #5a5e66;
    border-radius: 3px;
    background: #17181b;
}
QWidget#designerPanel QCheckBox::indicator:checked { background: #3d6fd9; border-color: #5b8def; }
QTableView#layerGrid {
    background: #1c1d21;
    border: 1px solid #2f3137;
}
QTableView#layerGrid QHeaderView::section:vertical {
    background: #1c1d21;
    color: #7c808a;
    font-weight: 500;
    border: none;
    padding: 0 8px 0 4px;
}
QTableView#layerGrid QHeaderView::section:horizontal {
    font-family: monospace;
    font-size: 9pt;
    font-weight: 500;
    color: #b4b8c1;
    padding: 5px 2px;
}
QTableView#layerGrid QHeaderView::section:horizontal:hover { color: #ffffff; background: #2b2d33; }
QWidget#expertStrip { background: transparent; }
QWidget#designerSide, QWidget#stripBox { background: transparent; }
"""

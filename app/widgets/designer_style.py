"""The designer's own style sheet: the controls it adds to the app's dark theme (resources/style.qss)."""
from app import theme

DESIGNER_QSS = theme.style_sheet("""
QLabel#designerTitle {
    font-size: 14pt;
    font-weight: 600;
    color: @text_strong;
}
QWidget#designerPanel QLabel#fieldLabel { color: @muted; }
QWidget#designerPanel QLabel#sectionTitle {
    font-size: 10.5pt;
    font-weight: 600;
    color: @text_secondary;
}
QLabel#explanationLabel {
    color: @text;
    background: @accent/0.10;
    border: 1px solid @accent/0.30;
    border-radius: 6px;
    padding: 6px 10px;
}
QLabel#verdictLabel { font-weight: 600; padding: 2px 0; }
QLabel#verdictLabel[fits="true"] { color: @ok; }
QLabel#verdictLabel[fits="false"] { color: @error; }
QLabel#designerNotice {
    color: @warning;
    background: @warning_fill/0.08;
    border: 1px solid @warning_fill/0.35;
    border-radius: 6px;
    padding: 6px 10px;
}
QLabel#oursOnlyBadge {
    color: @ours_only;
    background: @ours_only/0.12;
    border: 1px solid @ours_only/0.45;
    border-radius: 9px;
    padding: 1px 10px;
    font-size: 8.5pt;
    font-weight: 600;
}
QLabel#commandStatus[level="error"] { color: @error; }
QLabel#commandStatus[level="warning"] { color: @warning; }
QLabel#commandStatus[level="note"] { color: @note; }
QLabel#commandStatus[level="muted"] { color: @muted; }
QPushButton#autoFitButton {
    background: @highlight;
    border: 1px solid @highlight_hover;
    color: @on_accent;
    font-weight: 600;
    padding: 6px 20px;
}
QPushButton#autoFitButton:hover { background: @highlight_hover; }
QPushButton#addGpuButton {
    background: transparent;
    border: 1px dashed @border_light;
    color: @note;
    padding: 6px 10px;
}
QPushButton#addGpuButton:hover { border-color: @accent; background: @accent/0.08; }
QToolButton#designerTool {
    background: @control;
    border: 1px solid @border_strong;
    border-radius: 6px;
    padding: 4px 12px;
}
QToolButton#designerTool:hover { background: @control_hover; }
QToolButton#designerTool:disabled { color: @disabled; background: @raised; border-color: @border; }
QPlainTextEdit#commandLine {
    background: @sunken;
    border: 1px solid @control_hover;
    border-radius: 6px;
    padding: 4px 6px;
    color: @text;
    selection-background-color: @highlight;
}
QPlainTextEdit#commandLine:focus { border: 1px solid @accent; }
QWidget#designerPanel QCheckBox { color: @text_secondary; spacing: 6px; }
QWidget#designerPanel QCheckBox::indicator {
    width: 13px;
    height: 13px;
    border: 1px solid @disabled;
    border-radius: 3px;
    background: @sunken;
}
QWidget#designerPanel QCheckBox::indicator:checked { background: @highlight; border-color: @accent; }
QTableView#layerGrid {
    background: @view;
    border: 1px solid @border;
}
QTableView#layerGrid QHeaderView::section:vertical {
    background: @view;
    color: @placeholder;
    font-weight: 500;
    border: none;
    padding: 0 8px 0 4px;
}
QTableView#layerGrid QHeaderView::section:horizontal {
    font-family: monospace;
    font-size: 9pt;
    font-weight: 500;
    color: @text_secondary;
    padding: 5px 2px;
}
QTableView#layerGrid QHeaderView::section:horizontal:hover { color: @on_accent; background: @control; }
QWidget#expertStrip { background: transparent; }
QWidget#designerSide, QWidget#stripBox { background: transparent; }
""")

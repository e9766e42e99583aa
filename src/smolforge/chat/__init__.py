"""Chat templates (bundled .jinja files) and rendering with assistant-token masks."""

from smolforge.chat.render import (
    BUNDLED_TEMPLATES,
    RenderedExample,
    load_template,
    render_for_training,
    render_messages,
    render_with_spans,
    template_name,
)

__all__ = [
    "BUNDLED_TEMPLATES",
    "RenderedExample",
    "load_template",
    "render_for_training",
    "render_messages",
    "render_with_spans",
    "template_name",
]

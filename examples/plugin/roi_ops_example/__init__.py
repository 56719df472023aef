"""An example roi_ops backend plugin (see docs/plugins.md)."""

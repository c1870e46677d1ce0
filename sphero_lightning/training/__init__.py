"""The Lightning layer: module, data module, callbacks, the writer callback, the `sphero fit` CLI."""

"""DeepNav: shared code of the DeepNav 3D Slicer extension (imaging, torch runtime, CLI)."""

__version__ = "0.1.0"

"""Slide reading: one handle over cuCIM, OpenSlide and tiffslide."""

from .backends import BACKENDS, SLIDE_EXTENSIONS, CorruptTilesError, SlideBackend, backend_available, backend_order, open_backend
from .slide import Slide

__all__ = ["BACKENDS", "SLIDE_EXTENSIONS", "CorruptTilesError", "Slide", "SlideBackend", "backend_available", "backend_order",
           "open_backend"]

"""sorter: camera frames in, routing commands out, for warehouse sortation lines."""

__version__ = "0.1.0"

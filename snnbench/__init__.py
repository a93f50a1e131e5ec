"""snnbench: convert trained ANNs into spiking networks and measure what the conversion costs.

The Python API (snnbench.api): snnbench.convert, snnbench.simulate, snnbench.inspect, snnbench.methods, and the
finer steps of snnbench.convert (canonical, calibrate, convert_canonical, converted_of)."""

__version__ = "0.1.0"

_API = ("Converted", "Inspection", "Result", "calibrate", "canonical", "convert", "convert_canonical", "converted_of",
        "inspect", "methods", "simulate")


def __getattr__(name: str):
    # imported on first use, not with the package: the command line refuses a mistyped value before torch (which
    # the API needs) is imported, and every snnbench module imports this package first
    if name in _API:
        from snnbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'snnbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *_API]

"""snnbench: convert trained ANNs into spiking networks and measure what the conversion costs."""

__version__ = "0.1.0"

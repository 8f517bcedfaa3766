"""lorafuse: train, fuse and measure subject and style LoRAs for diffusion models."""

__version__ = "0.1.0"

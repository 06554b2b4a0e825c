"""python -m image_flow … (and torchrun … -m image_flow …): the image trainer's command line."""

from image_flow.trainer import cli

cli()

"""The stages: one module per command, each a short driver that reads earlier stages' artifacts
from the run directory (`w2sr.layout`) and never imports another stage."""

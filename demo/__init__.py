"""Runnable demonstrations built on the library, outside it: ``python -m demo.dino`` (DINO
alone: the online probe after pretraining) and ``python -m demo.vpretrain`` (``make demo``:
the four-arm V-pretraining comparison on synthetic scenes, evaluated by ``eval``)."""

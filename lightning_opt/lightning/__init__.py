"""lightning-opt built on ``lightning.pytorch`` (``import lightning as L``): ``lightning_opt.lightning.strategies``,
``.callbacks``, ``.tensorboard``, ``.examples``, ``.cli`` are the package's modules of the same names, served
per Lightning package from one source by :mod:`lightning_opt._flavour`."""

"""lightning-opt built on ``pytorch_lightning``: ``lightning_opt.pytorch_lightning.strategies``, ``.callbacks``,
``.tensorboard``, ``.examples``, ``.cli`` are the package's modules of the same names, served per Lightning
package from one source by :mod:`lightning_opt._flavour`."""

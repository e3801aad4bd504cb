"""Offline datasets and DataModules for the examples.

Nothing here touches the network unless asked to:

* :class:`DigitsDataModule` -- scikit-learn's bundled handwritten digits (1,797 real 8x8 images shipped inside
  the sklearn wheel), resized for timm CNNs; CIFAR-10 through torchvision is opt-in (``dataset="cifar10"``,
  downloaded only with ``download=True``).
* :class:`CharDataModule` -- a character-level corpus that exists offline on every Python install (the
  standard library's own ``*.py`` sources), or any text file the user names.

Splits and sampling are seeded, so two runs with the same arguments see the same batches in the same order.
For step-by-step trajectory comparisons under DDP-family strategies, pass ``shard=True`` together with
``Trainer(use_distributed_sampler=False)``: the train loader is then sharded with a non-shuffling
``DistributedSampler`` built here, instead of the shuffling one Lightning would inject.
"""

# The DataModules live in image_data.py / char_data.py (shared loaders: _loaders.py); this module keeps the
# ``lightning_opt.examples.data.<Name>`` paths that configs and scripts use.
from lightning_opt.examples.char_data import CharDataModule, load_text, stdlib_source_files
from lightning_opt.examples.image_data import DigitsDataModule, load_digits_tensors

__all__ = ["CharDataModule", "DigitsDataModule", "load_digits_tensors", "load_text", "stdlib_source_files"]

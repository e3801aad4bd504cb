"""Example models and offline datamodules, importable by class path from the ``lightning-opt`` CLI.

```
lightning-opt fit --model lightning_opt.examples.ImageClassifier \
    --data lightning_opt.examples.DigitsDataModule
lightning-opt fit --model lightning_opt.examples.CharTransformerLM \
    --data lightning_opt.examples.CharDataModule
```

Offline by default: scikit-learn's bundled digits and the Python standard library's sources as a text corpus.
scikit-learn / torchvision are imported lazily, only when a dataset needs them (``pip install
'lightning-opt[examples]'``).
"""

from lightning_opt.examples.charlm import CharTransformerLM
from lightning_opt.examples.data import CharDataModule, DigitsDataModule, load_digits_tensors, load_text
from lightning_opt.examples.image import DEFAULT_MODEL, ImageClassifier, adapt_to_small_inputs

__all__ = [
    "DEFAULT_MODEL",
    "CharDataModule",
    "CharTransformerLM",
    "DigitsDataModule",
    "ImageClassifier",
    "adapt_to_small_inputs",
    "load_digits_tensors",
    "load_text",
]

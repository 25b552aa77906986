"""Random-access data sources (``len(src)``, ``src[i] -> dict of numpy arrays``) for grain."""

from jaxattn.train.sources.digits import DigitsSource
from jaxattn.train.sources.mqar import MQARSource, multiquery_ar
from jaxattn.train.sources.text import CharTextSource
from jaxattn.train.sources.tfds_source import TfdsSource

__all__ = ["CharTextSource", "DigitsSource", "MQARSource", "TfdsSource", "multiquery_ar"]

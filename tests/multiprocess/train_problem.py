"""The training problem of the two-process training-loop test: a 1-layer ``DecoderLM`` on random
tokens through ``jaxattn.train.train``.

Pure functions of fixed seeds, so every process (and the single-process reference in the test)
builds the same model, source and config.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from jaxattn.models import DecoderLM, LMConfig, MixerConfig
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task

STEPS = 8  # optimizer steps of the whole run
SAVE_EVERY = 2
STOP_AFTER = 5  # the interrupted run stops in step 5's callback: its last checkpoint is step 4
BATCH = 8  # global batch (4 examples per process)
SEQ, VOCAB, EXAMPLES = 12, 32, 48
MODEL = LMConfig(vocab_size=VOCAB, width=16, max_length=SEQ, num_heads=2,
                 mixers=(MixerConfig("attention"),), mlp_ratio=2)


class Tokens:
    """``EXAMPLES`` random token sequences ``{"tokens": int32 [SEQ]}`` (random access)."""

    def __init__(self):
        self.tokens = np.random.default_rng(0).integers(0, VOCAB, (EXAMPLES, SEQ), np.int32)

    def __len__(self):
        return EXAMPLES

    def __getitem__(self, i):
        return {"tokens": self.tokens[i]}


def loss_fn(model, batch, rngs):
    """Next-token cross entropy of ``batch["tokens"] [B, SEQ]``."""
    h = model(batch["tokens"][:, :-1], deterministic=False, rngs=rngs)
    ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), batch["tokens"][:, 1:])
    return jnp.mean(ce), {}


def task(source=None):
    """The ``Task``: the model, ``loss_fn`` and ``source`` (``Tokens()`` by default)."""
    return Task(make_model=lambda rngs: DecoderLM(MODEL, rngs=rngs), loss_fn=loss_fn,
                train_source=Tokens() if source is None else source)


def config(checkpoint_dir="", log_dir="", **run):
    """The run's config: AdamW with a cosine schedule over ``STEPS``, async checkpoints every
    ``SAVE_EVERY`` steps (``run`` overrides ``RunConfig`` fields)."""
    base = RunConfig(steps=STEPS, batch_size=BATCH, log_every=1, progress=False, seed=0,
                     checkpoint_dir=checkpoint_dir, log_dir=log_dir, save_every=SAVE_EVERY,
                     keep=3, async_save=True)
    return ExperimentConfig(model=MODEL, data=None,
                            # eps well above rounding noise: the key projection's bias has a
                            # zero gradient (it shifts a query's logits equally), and AdamW with
                            # a tiny eps turns its rounding-level gradients into +-lr steps,
                            # so runs on other device counts would differ by far more than
                            # rounding in that parameter
                            optim=OptimConfig(learning_rate=3e-2, warmup_steps=2, eps=1e-3),
                            run=dataclasses.replace(base, **run))

"""NumPy's default generator, ``np.random.default_rng([seed, index])``, for many indices at
once: one *lane* per index, every lane's draws bit-identical to its own ``Generator``.

A vectorised generated source cannot call one ``Generator`` per example (that is the per-example
Python loop it replaces), and NumPy has no batched generator; but the default one is small
enough to emulate with array arithmetic:

* ``SeedSequence([seed, index])`` (NumPy's ``bit_generator.pyx``): two 32-bit entropy words
  hashed into a pool of four, expanded into four 64-bit words;
* ``PCG64`` (O'Neill's PCG XSL-RR 128/64): ``state = state * MULT + inc (mod 2^128)``, output
  ``rotr64(hi ^ lo, hi >> 58)`` of the new state. Draw ``j`` of every lane comes straight from
  ``state_j = A_j state_0 + G_j inc`` (``A_j = MULT^j``, ``G_j = 1 + MULT + ... + MULT^(j-1)``),
  so a ``[lanes, draws]`` block of outputs is a handful of array operations;
* the consumers of ``Generator``: ``next_uint32`` (low half of a 64-bit output, then the high
  half, buffered in the bit generator), ``next_double`` (``(u64 >> 11) * 2^-53``; leaves the
  32-bit buffer alone) and Lemire's bounded integers with rejection.

Only 128-bit products modulo ``2^128`` are needed; they are done in ``uint64`` halves with
wrap-around. ``tests/test_mqar_batch.py`` checks every piece against NumPy itself.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["Lanes"]

_M32 = np.uint64(0xFFFFFFFF)
_MULT = (2549297995355413924 << 64) + 4865540595714422341  # PCG_DEFAULT_MULTIPLIER_128
_MASK128 = (1 << 128) - 1

# SeedSequence's hash constants
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_POOL = 4


def _u32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64) & _M32


def _hashmix(value: np.ndarray, const: int) -> tuple[np.ndarray, int]:
    """SeedSequence's ``hashmix`` on uint32 values held in uint64 arrays; returns the new
    hash constant too (it is the same for every lane)."""
    value = _u32(value ^ np.uint64(const))
    const = (const * _MULT_A) & 0xFFFFFFFF
    value = _u32(value * np.uint64(const))
    return value ^ (value >> np.uint64(16)), const


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = _u32(np.uint64(_MIX_L) * x - np.uint64(_MIX_R) * y)
    return r ^ (r >> np.uint64(16))


def _seed_words(seed: int, index: np.ndarray) -> list[np.ndarray]:
    """``SeedSequence([seed, index]).generate_state(4, uint64)`` per lane: four ``uint64 [B]``.
    Needs ``0 <= seed, index < 2^32`` (one entropy word each)."""
    entropy = [np.full(index.shape, seed, dtype=np.uint64), index.astype(np.uint64)]
    const, pool = _INIT_A, []
    for i in range(_POOL):
        word = entropy[i] if i < len(entropy) else np.zeros(index.shape, np.uint64)
        mixed, const = _hashmix(word, const)
        pool.append(mixed)
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                hashed, const = _hashmix(pool[src], const)
                pool[dst] = _mix(pool[dst], hashed)
    const, halves = _INIT_B, []
    for i in range(2 * 4):
        value = pool[i % _POOL] ^ np.uint64(const)
        const = (const * _MULT_B) & 0xFFFFFFFF
        value = _u32(value * np.uint64(const))
        halves.append(value ^ (value >> np.uint64(16)))
    return [halves[2 * i] | (halves[2 * i + 1] << np.uint64(32)) for i in range(4)]


def _mul64(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full 128-bit product of uint64 arrays: ``(hi, lo)``."""
    a0, a1, b0, b1 = a & _M32, a >> np.uint64(32), b & _M32, b >> np.uint64(32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    lo = (p00 & _M32) | (mid << np.uint64(32))
    hi = p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    return hi, lo


def _mul128(ah, al, bh, bl) -> tuple[np.ndarray, np.ndarray]:
    """``a * b mod 2^128`` of 128-bit numbers held as ``(hi, lo)`` uint64 arrays."""
    hi, lo = _mul64(al, bl)
    return hi + ah * bl + al * bh, lo


def _add128(ah, al, bh, bl) -> tuple[np.ndarray, np.ndarray]:
    lo = al + bl
    return ah + bh + (lo < al).astype(np.uint64), lo


def _split(x: int) -> tuple[np.uint64, np.uint64]:
    return np.uint64(x >> 64), np.uint64(x & 0xFFFFFFFFFFFFFFFF)


@functools.lru_cache(maxsize=16)
def _jump_table(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(A_hi, A_lo, G_hi, G_lo)``, each ``uint64 [n]``: ``A_j = MULT^j`` and
    ``G_j = sum_{t<j} MULT^t`` (mod 2^128) for ``j = 1..n``."""
    a, g, rows = 1, 0, []
    for _ in range(n):
        g = (g + a) & _MASK128
        a = (a * _MULT) & _MASK128
        rows.append((*_split(a), *_split(g)))
    out = np.array(rows, dtype=np.uint64).reshape(n, 4)
    return tuple(np.ascontiguousarray(out[:, i]) for i in range(4))  # type: ignore[return-value]


def _xsl_rr(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    x = hi ^ lo
    rot = hi >> np.uint64(58)
    return (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))


class Lanes:
    """``default_rng([seed, i])`` for every ``i`` of ``index`` (``int [B]``), consumed in
    lock-step or lane by lane. Draw methods take ``active`` (``bool [B]``) where lanes may
    draw different amounts; inactive lanes do not advance.

    State per lane, as in NumPy's ``PCG64`` + ``Generator``: ``pos`` (64-bit outputs used),
    ``half`` (a buffered high 32-bit half exists) and ``buf`` (that half).
    """

    def __init__(self, seed: int, index: np.ndarray, *, draws: int = 64):
        index = np.asarray(index, dtype=np.int64)
        if not 0 <= seed < 2**32 or (index.size and not 0 <= index.min() <= index.max() < 2**32):
            raise ValueError("Lanes needs seed and indices in [0, 2^32)")
        s_hi, s_lo, i_hi, i_lo = _seed_words(seed, index)
        # pcg_setseq_128_srandom_r: inc = (initseq << 1) | 1; state = 0; step; += initstate; step
        self._inc = ((i_hi << np.uint64(1)) | (i_lo >> np.uint64(63)),
                     (i_lo << np.uint64(1)) | np.uint64(1))
        st = self._inc  # one step from state 0 is inc
        st = _add128(*st, s_hi, s_lo)
        m_hi, m_lo = _split(_MULT)
        st = _add128(*_mul128(*st, np.full_like(s_hi, m_hi), np.full_like(s_lo, m_lo)),
                     *self._inc)
        self._state0 = st
        self.size = index.shape[0]
        self._out = np.zeros((self.size, 0), dtype=np.uint64)
        self.pos = np.zeros(self.size, dtype=np.int64)
        self.half = np.zeros(self.size, dtype=bool)
        self.buf = np.zeros(self.size, dtype=np.uint64)
        self._rows = np.arange(self.size)
        self._ensure(draws)

    # ---- raw outputs ------------------------------------------------------------------------
    def _ensure(self, n: int) -> None:
        """Make the first ``n`` 64-bit outputs of every lane available."""
        have = self._out.shape[1]
        if n <= have:
            return
        n = max(n, 2 * have)
        a_hi, a_lo, g_hi, g_lo = (t[have:n] for t in _jump_table(n))
        s_hi, s_lo = (x[:, None] for x in self._state0)
        c_hi, c_lo = (x[:, None] for x in self._inc)
        st = _add128(*_mul128(s_hi, s_lo, a_hi, a_lo), *_mul128(c_hi, c_lo, g_hi, g_lo))
        self._out = np.concatenate([self._out, _xsl_rr(*st)], axis=1)

    def raw(self, n: int) -> np.ndarray:
        """The first ``n`` outputs of every lane (``random_raw``), ``uint64 [B, n]``."""
        self._ensure(n)
        return self._out[:, :n]

    # ---- Generator's consumers --------------------------------------------------------------
    def doubles(self, count: np.ndarray) -> np.ndarray:
        """``rng.random(count[b])`` per lane, left-aligned in ``float64 [B, max(count)]``
        (entries past a lane's count are garbage)."""
        count = np.asarray(count, dtype=np.int64)
        width = int(count.max(initial=0))
        self._ensure(int((self.pos + width).max(initial=0)) + 1)
        cols = self.pos[:, None] + np.arange(width)
        u = self._out[self._rows[:, None], cols]
        self.pos = self.pos + count
        return (u >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)

    def uint32(self, active: np.ndarray) -> np.ndarray:
        """``next_uint32`` on the active lanes (``uint64 [B]``; 0 on inactive lanes)."""
        self._ensure(int(self.pos.max(initial=0)) + 1)
        fresh = self._out[self._rows, np.minimum(self.pos, self._out.shape[1] - 1)]
        from_buf = active & self.half
        from_new = active & ~self.half
        value = np.where(from_buf, self.buf, fresh & _M32)
        self.buf = np.where(from_new, fresh >> np.uint64(32), self.buf)
        self.pos = self.pos + from_new
        self.half = np.where(active, ~self.half, self.half)
        return np.where(active, value, np.uint64(0))

    def bounded(self, bound: np.ndarray | int, active: np.ndarray | None = None) -> np.ndarray:
        """Lemire's ``random_bounded_uint64(0, bound)`` (``bound < 2^32 - 1``: inclusive upper
        end) on the active lanes, with its rejection loop; ``int64 [B]``."""
        active = np.ones(self.size, bool) if active is None else active
        rng_excl = np.broadcast_to(np.asarray(bound, np.uint64) + np.uint64(1), (self.size,))
        threshold = (np.uint64(0xFFFFFFFF) - (rng_excl - np.uint64(1))) % rng_excl
        out = np.zeros(self.size, np.uint64)
        need = active & (rng_excl > 1)  # bound 0 returns 0 without drawing
        while need.any():
            m = self.uint32(need) * rng_excl
            ok = need & ((m & _M32) >= threshold)
            out = np.where(ok, m >> np.uint64(32), out)
            need = need & ~ok
        return out.astype(np.int64)

    def bounded_many(self, bound: int, n: int) -> np.ndarray:
        """``rng.integers(0, bound + 1, size=n)`` on every lane, ``int64 [B, n]``: each draw
        is accepted or rejected on its own 32-bit value, so the accepted draws are found in one
        pass over each lane's stream of 32-bit halves."""
        rng_excl = np.uint64(bound + 1)
        threshold = (np.uint64(0xFFFFFFFF) - np.uint64(bound)) % rng_excl
        extra = 8
        while True:
            words = (n + extra + 1) // 2 + 1
            self._ensure(int(self.pos.max(initial=0)) + words)
            cols = self.pos[:, None] + np.arange(words)
            u = self._out[self._rows[:, None], cols]
            halves = np.stack([u & _M32, u >> np.uint64(32)], axis=-1).reshape(self.size, -1)
            stream = np.concatenate([self.buf[:, None], halves], axis=1)
            start = np.where(self.half, 0, 1)  # a buffered half comes first
            taken = np.arange(stream.shape[1])[None, :] >= start[:, None]
            m = stream * rng_excl
            ok = taken & ((m & _M32) >= threshold)
            if (ok.sum(axis=1) >= n).all():
                break
            extra *= 4
        rank = np.cumsum(ok, axis=1)
        keep = ok & (rank <= n)
        values = (m >> np.uint64(32))[keep].reshape(self.size, n).astype(np.int64)
        last = np.argmax(rank >= n, axis=1) if n else start - 1  # the last stream entry used
        used = last + 1 - start  # 32-bit draws consumed per lane
        consumed_buf = self.half & (used > 0)
        fresh = used - consumed_buf  # halves taken from new 64-bit outputs
        self.pos = self.pos + (fresh + 1) // 2
        odd = (fresh % 2) == 1
        new_half = np.where(used > 0, odd, self.half)
        last_word = self._out[self._rows, np.maximum(self.pos - 1, 0)]
        self.buf = np.where(odd & (used > 0), last_word >> np.uint64(32), self.buf)
        self.half = new_half
        return values

"""User-defined events on samples: Above, Below, Between, Equals and their conjunction.

An event is built from a function `fn` of a sample x (..., k) that returns one value per
sample (...), any differentiable torch function, in the units the caller works in
(physical units for `DensityEstimator`). Each elementary event is an interval on fn(x):

    Above(fn, t)        fn(x) > t             constraint C = fn(x) - t
    Below(fn, t)        fn(x) < t             constraint C = t - fn(x)
    Between(fn, a, b)   a < fn(x) < b         constraints fn(x) - a, b - fn(x)
    Equals(fn, v, tol)  |fn(x) - v| <= tol    constraint C = tol - |fn(x) - v|

and `e1 & e2` (or `All(e1, e2, ...)`) is their conjunction. Constraints are positive where
the event holds; `indicator(x)` says whether all hold. The guidance methods read the
elementary events through `atoms()`.
"""
from __future__ import annotations

import math

import torch


class Event:
    """Base class: a set of samples defined by constraints C_i(x) > 0."""

    def atoms(self) -> tuple["Interval", ...]:
        raise NotImplementedError

    def constraints(self, x: torch.Tensor) -> torch.Tensor:
        """All constraints at x (..., k): (..., m), positive where satisfied."""
        return torch.cat([a._constraints(a.value(x)) for a in self.atoms()], dim=-1)

    def constraint(self, x: torch.Tensor) -> torch.Tensor:
        """The smallest constraint (...): the event holds where it is positive."""
        return self.constraints(x).min(-1).values

    def indicator(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean (...): whether x lies in the event."""
        return torch.stack([a._holds(a.value(x)) for a in self.atoms()], -1).all(-1)

    def compose(self, transform) -> "Event":
        """The same event on z, where x = transform(z): each fn becomes fn(transform(z)).

        Used to state events in physical units and evaluate them on normalised samples.
        """
        return All(*(a._with_fn(_Composed(a.fn, transform)) for a in self.atoms()))

    def __and__(self, other):
        if not isinstance(other, Event):
            return NotImplemented
        return All(self, other)


class Interval(Event):
    """lo < fn(x) < hi (either end may be infinite); the base of Above, Below, Between."""

    def __init__(self, fn, lo: float = -math.inf, hi: float = math.inf):
        if not callable(fn):
            raise TypeError(f"an event needs a callable fn(x) -> tensor, got {type(fn).__name__}")
        lo, hi = float(lo), float(hi)
        if math.isnan(lo) or math.isnan(hi) or not lo < hi or (math.isinf(lo) and math.isinf(hi)):
            raise ValueError(f"an interval event needs lo < hi with at least one finite end, got ({lo}, {hi})")
        self.fn, self.lo, self.hi = fn, lo, hi

    def atoms(self):
        return (self,)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        v = self.fn(x)
        if not torch.is_tensor(v) or v.shape != x.shape[:-1]:
            shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"event function must map samples {tuple(x.shape)} to one value per sample "
                             f"{tuple(x.shape[:-1])}, got {shape}")
        return v

    def _constraints(self, v):
        parts = ([v - self.lo] if math.isfinite(self.lo) else []) + ([self.hi - v] if math.isfinite(self.hi) else [])
        return torch.stack(parts, -1)

    def _holds(self, v):
        return (v > self.lo) & (v < self.hi)

    def _with_fn(self, fn):
        return Interval(fn, self.lo, self.hi)

    def __repr__(self):
        return f"{type(self).__name__}({_name(self.fn)}, lo={self.lo:g}, hi={self.hi:g})"


class Above(Interval):
    def __init__(self, fn, threshold: float):
        super().__init__(fn, threshold, math.inf)


class Below(Interval):
    def __init__(self, fn, threshold: float):
        super().__init__(fn, -math.inf, threshold)


class Between(Interval):
    def __init__(self, fn, lo: float, hi: float):
        super().__init__(fn, lo, hi)


class Equals(Interval):
    """|fn(x) - value| <= tol, tol > 0: an interval that the "moment" guidance treats as a
    Gaussian observation of fn(x) (see guidance.scores)."""

    def __init__(self, fn, value: float, tol: float):
        if not float(tol) > 0:
            raise ValueError(f"Equals needs a tolerance tol > 0, got {tol}")
        super().__init__(fn, float(value) - float(tol), float(value) + float(tol))
        self.target, self.tol = float(value), float(tol)

    def _constraints(self, v):
        return (self.tol - (v - self.target).abs())[..., None]

    def _holds(self, v):
        return (v - self.target).abs() <= self.tol

    def _with_fn(self, fn):
        return Equals(fn, self.target, self.tol)

    def __repr__(self):
        return f"Equals({_name(self.fn)}, {self.target:g}, tol={self.tol:g})"


class All(Event):
    """The conjunction of events: all must hold."""

    def __init__(self, *events: Event):
        bad = [type(e).__name__ for e in events if not isinstance(e, Event)]
        if bad or not events:
            raise TypeError(f"All() takes one or more events, got {bad or 'none'}")
        self._atoms = tuple(a for e in events for a in e.atoms())

    def atoms(self):
        return self._atoms

    def __repr__(self):
        return " & ".join(map(repr, self._atoms))


def as_event(event) -> Event:
    """`event`, checked: a clear error for anything that is not an Event."""
    if not isinstance(event, Event):
        raise TypeError(f"expected an event (densiformer.events.Above, Below, Between, Equals or a "
                        f"conjunction with &), got {type(event).__name__}")
    return event


class _Composed:
    def __init__(self, fn, transform):
        self.fn, self.transform = fn, transform

    def __call__(self, z):
        return self.fn(self.transform(z))

    def __repr__(self):
        return _name(self.fn)


def _name(fn):
    return getattr(fn, "__name__", None) or repr(fn)

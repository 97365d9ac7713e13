"""Calibrators: router logits z (N x E) -> calibrated axis probabilities (DESIGN.md section 5).

A router's softmax is usually over-confident on new prompts, so a calibrator is fitted on a
split the router was *not* trained on: ``none`` (softmax), ``temperature`` (Guo et al. 2017;
AlignX's "natural"), ``importance`` (TrinityX task-vector prior), ``fractal`` (AlignX) and
"a+b" compositions. Each has ``fit(logits, labels, features=None) -> self``, ``probs(logits,
features=None)`` and a JSON-serialisable ``state_dict`` that ``Calibrator.from_state_dict``
turns back into an identical calibrator. Internally everything runs in float64.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from mocae import AXES
from mocae.mixture.fractal import DEFAULT_EPS, box_counting_dimension, local_dimension_mle, random_projection

# T is searched in [0.01, 100]: wider than any useful temperature, and it keeps separable
# fit data (where the NLL keeps falling as T -> 0) from producing T = 0.
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


def _validate(logits, labels=None, features=None, *, fit: bool = False):
    """Check shapes, dtypes and ranges; return float64 logits, int64 labels, float64 features."""
    z = torch.as_tensor(logits).detach()
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be a 2-D N x E tensor with E >= 2, got shape {tuple(z.shape)}")
    n, e = z.shape
    if fit and (n == 0 or labels is None):
        raise ValueError("cannot fit a calibrator on an empty split (0 rows)" if n == 0 else "fit needs labels")
    z = z.to(torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    y = None
    if labels is not None:
        y = torch.as_tensor(labels).detach()
        if y.dim() != 1 or y.shape[0] != n or y.is_floating_point() or y.is_complex():
            raise ValueError(f"labels must be 1-D integers, N={n} of them; got {y.dtype} {tuple(y.shape)}")
        y = y.to(torch.int64)
        if n and (y.min() < 0 or y.max() >= e):
            raise ValueError(f"labels must lie in 0..{e - 1}, got range {int(y.min())}..{int(y.max())}")
    x = None
    if features is not None:
        x = torch.as_tensor(features).detach().to(torch.float64)
        if x.dim() != 2 or x.shape[0] != n or not torch.isfinite(x).all():
            raise ValueError(f"features must be finite, 2-D with N={n} rows; got shape {tuple(x.shape)}")
    return z, y, x


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, offset: torch.Tensor | float = 0.0) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T + offset) (offset: e.g. a log-prior).

    The NLL is convex in 1/T, hence unimodal in log T, so a golden-section search on log T over
    ``LOG_T_BOUNDS`` finds the optimum deterministically without gradients or scipy.
    """

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t) + offset, labels).item()

    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = LOG_T_BOUNDS
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):  # the bracket shrinks by 0.618 per step: 9.2 * 0.618^60 ~ 3e-12
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


class Calibrator:
    """Base class. Subclasses implement ``_fit`` and ``_log_probs(z, x) -> N x E log-probs`` (float64
    in and out) and list the attributes of their state: constructor arguments, fitted values."""

    name = "base"
    needs_fit = True
    init_keys: tuple[str, ...] = ()
    fitted_keys: tuple[str, ...] = ()

    def __init__(self):
        self.num_classes: int | None = None

    def fit(self, logits, labels, features=None) -> "Calibrator":
        """Fit on a held-out split. Args: logits N x E, labels N in 0..E-1, features N x D.
        Returns: self."""
        z, y, x = _validate(logits, labels, features, fit=True)
        self.num_classes = z.shape[1]
        self._fit(z, y, x)
        return self

    def log_probs(self, logits, features=None) -> torch.Tensor:
        """Calibrated log-probabilities (N x E, float64)."""
        z, _, x = _validate(logits, None, features)
        if self.needs_fit and self.num_classes is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")
        if self.num_classes is not None and z.shape[1] != self.num_classes:
            raise ValueError(f"calibrator was fitted on {self.num_classes} experts, logits have {z.shape[1]}")
        return self._log_probs(z, x)

    def probs(self, logits, features=None) -> torch.Tensor:
        """Calibrated probabilities, N x E, rows summing to 1, in the logits' float dtype."""
        dtype = logits.dtype if isinstance(logits, torch.Tensor) and logits.is_floating_point() else torch.float32
        return self.log_probs(logits, features).exp().to(dtype)

    def state_dict(self) -> dict:
        """JSON-serialisable state (names, ints, floats, lists), enough to rebuild the calibrator."""
        return {"name": self.name, "num_classes": self.num_classes, **self._state()}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "Calibrator":
        """Rebuild from ``state_dict()``; on the base class, the type comes from ``state["name"]``."""
        target = ComposedCalibrator if "+" in state["name"] else CALIBRATORS.get(state["name"])
        if target is None or not issubclass(target, cls):
            raise ValueError(f"state of calibrator {state['name']!r} cannot be loaded by {cls.__name__}")
        calibrator = target._from_state(state)
        calibrator.num_classes = state["num_classes"]
        return calibrator

    def _fit(self, z, y, x) -> None:
        """Nothing to fit by default (IdentityCalibrator)."""

    def _state(self) -> dict:
        return {key: getattr(self, key) for key in self.init_keys + self.fitted_keys}

    @classmethod
    def _from_state(cls, state: Mapping) -> "Calibrator":
        calibrator = cls(**{key: state[key] for key in cls.init_keys})
        for key in cls.fitted_keys:
            setattr(calibrator, key, state[key])
        return calibrator


class IdentityCalibrator(Calibrator):
    """softmax(z): the uncalibrated baseline. ``fit`` only validates and records E."""

    name = "none"
    needs_fit = False

    def _log_probs(self, z, x):
        return z.log_softmax(dim=1)


class TemperatureCalibrator(Calibrator):
    """softmax(z / T) with T fitted by NLL on the held-out split (Guo et al. 2017).

    T > 1 softens an over-confident router, T < 1 sharpens an under-confident one; the argmax
    (and so accuracy) never changes.
    """

    name = "temperature"
    init_keys = ("temperature",)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)

    def _fit(self, z, y, x):
        self.temperature = fit_temperature(z, y)

    def _log_probs(self, z, x):
        return (z / self.temperature).log_softmax(dim=1)


class ImportanceCalibrator(Calibrator):
    """TrinityX importance weighting: p_i proportional to gamma_i * softmax(z / T)_i.

    gamma are positive prior weights per expert, computed from task-vector inner products
    <tau_i, tau_ref> (``mocae.experts.task_vectors.importance_weights``): they tilt the
    probabilities towards experts whose task vector aligns with the reference. T is fitted by
    NLL *with* the log-gamma prior in place, i.e. on softmax(z / T + log gamma), so T corrects
    only the over-confidence the prior leaves. Uniform gamma reduces this to temperature scaling.

    Args:
        gamma: E positive weights (normalised to sum 1), a list in expert order or a dict name ->
            weight, read in the order of ``names``.
        names: the experts in logit-column order, for a dict ``gamma`` (it must name exactly
            them); default: ``mocae.AXES`` when its keys are the axes, else the dict's own order.
    """

    name = "importance"
    init_keys = ("gamma", "temperature")

    def __init__(self, gamma: Sequence[float] | Mapping[str, float], temperature: float = 1.0,
                 names: Sequence[str] | None = None):
        super().__init__()
        if isinstance(gamma, Mapping):
            if names is not None and set(names) != set(gamma):
                raise ValueError(f"gamma names {sorted(gamma)} are not the experts {list(names)}")
            names = list(names) if names is not None else list(AXES) if set(gamma) == set(AXES) else list(gamma)
            gamma = [gamma[n] for n in names]
        g = torch.as_tensor([float(v) for v in gamma], dtype=torch.float64)
        if g.numel() < 2 or not torch.isfinite(g).all() or (g <= 0).any():
            raise ValueError(f"gamma must be at least 2 finite, strictly positive weights, got {list(gamma)}")
        self.gamma = (g / g.sum()).tolist()
        self.temperature = float(temperature)

    def _log_gamma(self, z):
        if z.shape[1] != len(self.gamma):
            raise ValueError(f"gamma has {len(self.gamma)} weights but logits have {z.shape[1]} experts")
        return torch.tensor(self.gamma, dtype=torch.float64).log()

    def _fit(self, z, y, x):
        self.temperature = fit_temperature(z, y, offset=self._log_gamma(z))

    def _log_probs(self, z, x):
        return (z / self.temperature + self._log_gamma(z)).log_softmax(dim=1)


class FractalCalibrator(Calibrator):
    """AlignX's fractal calibrator, mixed with temperature scaling.

    Fit: project features with a fixed seeded Gaussian matrix to ``proj_dim`` dims, min-max
    scale to the unit cube with fit-split statistics, and store per axis e the box-counting
    dimension D_e of axis e's fit points together with those points. For a prompt x, D_hat_e(x)
    is the Levina-Bickel local dimension from its ``k`` nearest axis-e fit points
    (``fractal.local_dimension_mle``); far from axis e's cloud it grows, so the gap is large.
        z_frac_e = z_e - beta * |D_hat_e(x) - D_e|
        p = lambdas[0] * softmax(z_frac) + lambdas[1] * softmax(z / T)
    T is fitted as in ``TemperatureCalibrator``; beta is the ``beta_grid`` value with the lowest
    fit-split NLL (fit points scored leave-one-out); 0 is in the grid, so a useless penalty is
    switched off. Features are required in ``fit`` and ``probs``; each axis needs >= 3 fit prompts.
    """

    name = "fractal"
    init_keys = ("lambdas", "beta_grid", "proj_dim", "k", "seed", "eps")
    fitted_keys = ("temperature", "beta", "nll_by_beta", "in_dim", "lo", "hi", "dims", "features")

    def __init__(self, lambdas=(0.6, 0.4), beta_grid=(0.0, 0.1, 0.25, 0.5, 1.0, 2.0),
                 proj_dim: int = 8, k: int = 10, seed: int = 0, eps=DEFAULT_EPS):
        super().__init__()
        lam = [float(v) for v in lambdas]
        if len(lam) != 2 or min(lam) < 0 or sum(lam) <= 0:
            raise ValueError(f"lambdas must be two non-negative weights, not both 0, got {lambdas}")
        self.lambdas = [v / sum(lam) for v in lam]
        self.beta_grid = [float(b) for b in beta_grid]
        if not self.beta_grid or min(self.beta_grid) < 0:
            raise ValueError(f"beta_grid must be non-empty and non-negative, got {beta_grid}")
        self.proj_dim, self.k, self.seed, self.eps = int(proj_dim), int(k), int(seed), [float(e) for e in eps]
        # Fitted: nll_by_beta = [[beta, fit NLL], ...] (diagnostics), lo/hi = min-max scaling of
        # the projected fit split, dims = D_e per axis, features = scaled fit points per axis.
        self.temperature, self.beta, self.in_dim = 1.0, 0.0, None
        self.nll_by_beta, self.lo, self.hi, self.dims, self.features = [], [], [], [], []

    def _project(self, x):
        if x is None:
            raise ValueError("FractalCalibrator needs router features (N x D); pass features=...")
        if self.in_dim is not None and x.shape[1] != self.in_dim:
            raise ValueError(f"features have {x.shape[1]} columns, the calibrator was fitted on {self.in_dim}")
        proj = x @ random_projection(x.shape[1], self.proj_dim, self.seed)
        if self.in_dim is None:  # fitting: fix the scaling from this split
            self.lo, self.hi = proj.min(dim=0).values.tolist(), proj.max(dim=0).values.tolist()
        lo, hi = torch.tensor(self.lo, dtype=torch.float64), torch.tensor(self.hi, dtype=torch.float64)
        return (proj - lo) / (hi - lo).clamp_min(1e-12)  # new points may leave [0, 1]: fine for k-NN

    def _gaps(self, points, own_labels=None):
        """|D_hat_e(x) - D_e| for every point and axis (N x E); ``own_labels``: leave-one-out."""
        gaps = []
        for e, ref in enumerate(self.features):
            ref = torch.tensor(ref, dtype=torch.float64)
            d_hat = local_dimension_mle(points, ref, self.k)
            if own_labels is not None:
                d_hat[own_labels == e] = local_dimension_mle(ref, ref, self.k, exclude_self=True)
            gaps.append((d_hat - self.dims[e]).abs())
        return torch.stack(gaps, dim=1)

    def _mix(self, z, gaps, beta):
        frac = (z - beta * gaps).log_softmax(dim=1) + math.log(self.lambdas[0] or 1e-300)
        natural = (z / self.temperature).log_softmax(dim=1) + math.log(self.lambdas[1] or 1e-300)
        return torch.logsumexp(torch.stack([frac, natural]), dim=0)

    def _fit(self, z, y, x):
        counts = torch.bincount(y, minlength=z.shape[1])
        if counts.min() < 3:  # leave-one-out k-NN needs >= 2 other points of the axis
            raise ValueError(f"fractal calibration needs >= 3 fit prompts per axis, got counts {counts.tolist()}")
        self.in_dim = None
        points = self._project(x)
        self.in_dim = x.shape[1]
        self.features = [points[y == e].tolist() for e in range(z.shape[1])]
        self.dims = [box_counting_dimension(points[y == e], self.eps) for e in range(z.shape[1])]
        self.temperature = fit_temperature(z, y)
        gaps = self._gaps(points, own_labels=y)
        self.nll_by_beta = [[b, F.nll_loss(self._mix(z, gaps, b), y).item()] for b in self.beta_grid]
        self.beta = min(self.nll_by_beta, key=lambda bn: bn[1])[0]  # first of equals: smallest penalty

    def _log_probs(self, z, x):
        return self._mix(z, self._gaps(self._project(x)), self.beta)


class ComposedCalibrator(Calibrator):
    """Calibrators in sequence: stage i's log-probabilities are stage i+1's logits.

    Each stage is fitted on the previous stage's output for the fit split, so e.g.
    "importance+temperature" re-tempers the importance-tilted distribution. Features go to
    every stage unchanged.
    """

    def __init__(self, stages: Sequence[Calibrator]):
        super().__init__()
        if not stages:
            raise ValueError("ComposedCalibrator needs at least one stage")
        self.stages = list(stages)
        self.name = "+".join(s.name for s in self.stages)

    def _fit(self, z, y, x):
        for stage in self.stages:
            z = stage.fit(z, y, x).log_probs(z, x)

    def _log_probs(self, z, x):
        for stage in self.stages:
            z = stage.log_probs(z, x)
        return z

    def _state(self):
        return {"stages": [s.state_dict() for s in self.stages]}

    @classmethod
    def _from_state(cls, state):
        return cls([Calibrator.from_state_dict(s) for s in state["stages"]])


CALIBRATORS: dict[str, type[Calibrator]] = {"none": IdentityCalibrator, "temperature": TemperatureCalibrator,
                                             "importance": ImportanceCalibrator, "fractal": FractalCalibrator}


def build_calibrator(name: str, **kwargs) -> Calibrator:
    """A new (unfitted) calibrator by name: one of ``CALIBRATORS`` or a "+"-joined composition.

    Keyword arguments go to every stage whose constructor accepts them (e.g. ``gamma`` to
    "importance", ``lambdas`` to "fractal"); one that no stage accepts is an error.
    """
    parts = [p.strip() for p in name.split("+")]
    unknown = [p for p in parts if p not in CALIBRATORS]
    if unknown:
        raise ValueError(f"unknown calibrator {name!r}; choose from {sorted(CALIBRATORS)} or 'a+b' compositions")
    stages, used = [], set()
    for part in parts:
        cls = CALIBRATORS[part]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        used |= accepted & set(kwargs)
        stages.append(cls(**{k: v for k, v in kwargs.items() if k in accepted}))
    if set(kwargs) - used:
        raise ValueError(f"calibrator {name!r} takes no argument(s) {sorted(set(kwargs) - used)}")
    return stages[0] if len(stages) == 1 else ComposedCalibrator(stages)

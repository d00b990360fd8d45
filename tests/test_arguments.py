"""Argument hardening of `EMACallback` and `EMASchedule`, property-based.

Contract checked for every constructor argument and ANY value a user might pass:

* either the value is accepted, and then a short `fit` completes (applying only decays in [0, 1) and leaving a finite EMA)
  or fails with a `TypeError`/`ValueError` whose message names the argument;
* or it is refused AT CONSTRUCTION with a `TypeError`/`ValueError` whose message names the argument, and the refused
  construction leaves nothing behind (no change to the `Learner`, `EMACallback` or `EMASchedule` class attributes).

Never an AssertionError, a torch RuntimeError, an IndexError, a ZeroDivisionError, an OverflowError, or a message that
only names another argument. The tests restore whatever global state they touch (RNGs);
warnings are silenced only inside `warnings.catch_warnings()`.
"""
import functools, random, re, shutil, tempfile, threading, warnings
from contextlib import contextmanager
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import HealthCheck, example, given, settings, strategies as st

from fastai.basics import Learner, Callback, DataLoaders, MSELossFlat, SGD
from fastai.data.load import DataLoader

from fastxtend_ema import EMACallback, EMASchedule, BEMACallback, SchedCos, SchedLin, SchedExp, SchedPoly, PowerDecay, ThresholdDecay, ExpDecay
from fastai.callback.schedule import SchedNo

INF, NAN = float('inf'), float('nan')
HUGE = 10**400   # an int no float can hold

# derandomize: reproducible in CI; database=None: no .hypothesis folder in the repo
CHEAP = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
FITS = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- readable callables

class Named:
    "A callable with a readable repr, so hypothesis reports say what was passed"
    def __init__(self, name, f): self.name,self.f = name,f
    def __call__(self, *args): return self.f(*args)
    def __repr__(self): return self.name

class Const(Named):
    "A decay form `f(step, total)` returning `v` at every step"
    def __init__(self, v): super().__init__(f'Const({v!r})', lambda step, total: v)

class EndsOk(Named):
    "A decay form returning 0.5 at step 1 and at the last step, and `mid` in between (and after: resumed fits)"
    def __init__(self, mid): super().__init__(f'EndsOk(mid={mid!r})', lambda step, total: 0.5 if step in (1, total) else mid)

class NoArgs:
    "A callable taking no argument"
    def __call__(self): return 0.5
    def __repr__(self): return 'NoArgs()'

class SchedConst(Named):
    "A schedule `f(start, end)` whose `pos -> decay` returns `v` everywhere"
    def __init__(self, v): super().__init__(f'SchedConst({v!r})', lambda start, end: (lambda pos: v))

class SchedReturns(Named):
    "A schedule `f(start, end)` returning `v` instead of a `pos -> decay` function"
    def __init__(self, v): super().__init__(f'SchedReturns({v!r})', lambda start, end: v)

def _bump(start, end): return lambda pos: start + (end-start)*pos + 2*pos*(1-pos)   # > 1 between the ends
SCHED_BUMP = Named('SchedBump (in [0,1) at pos 0 and 1, > 1 in between)', _bump)
def _nan_mid(start, end): return lambda pos: start if pos in (0., 1.) else NAN
SCHED_NAN_MID = Named('SchedNaNMid (NaN strictly between pos 0 and 1)', _nan_mid)
SCHED_INNER_NOARGS = Named('SchedInnerNoArgs (returns a function of no argument)', lambda start, end: (lambda: 0.5))
SCHED_NOARGS = Named('SchedNoArgs (a schedule taking no argument)', lambda: (lambda pos: 0.5))


# ----------------------------------------------------------------------------- values: valid and nasty

class Weird:
    "An object whose comparisons and conversions raise"
    def __eq__(self, o): raise RuntimeError('Weird.__eq__')
    def __ne__(self, o): raise RuntimeError('Weird.__ne__')
    def __bool__(self): raise RuntimeError('Weird.__bool__')
    __hash__ = object.__hash__
    def __repr__(self): return 'Weird()'

ALL_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
FLOAT_DTYPES = [d for d in ALL_DTYPES if d.is_floating_point]
DEVICE_STRINGS = ['cpu', 'cpu:0', 'cpu:1', 'cpu:-1', 'CPU', ' cpu', 'cpu:', 'cpu:x', 'cpu:99999999999999999999', '',
                  'cuda', 'cuda:0', 'cuda:7', 'cuda:-1', 'meta', 'mps', 'xpu', 'xla', 'hpu', 'mtia', 'lazy', 'vulkan',
                  'ipu', 'hip', 've', 'fpga', 'maia', 'ort', 'opengl', 'opencl', 'ideep', 'privateuseone']

NUMPY_VALUES = [np.float64(0.5), np.float32(0.25), np.float16(0.5), np.int64(1), np.int64(0), np.int8(-1),
                np.uint64(2**64-1), np.bool_(True), np.bool_(False), np.float64(NAN), np.float64(INF), np.complex128(0.5),
                np.array(0.5), np.array([0.5]), np.array([1, 2]), np.array([]), np.array(True), np.array([True, False])]
TORCH_VALUES = [torch.tensor(0.5), torch.tensor([0.5, 0.5]), torch.tensor(True), torch.tensor(1), torch.tensor(NAN),
                torch.zeros(0), torch.float32, torch.int64, torch.device('cpu')]
MISC_VALUES = [object(), Weird(), Decimal('0.5'), Decimal('NaN'), Fraction(1, 2), Fraction(HUGE, 1), float, int, bool, str,
               type(None), Ellipsis, NotImplemented, range(2), (0.5,), {0.5}, b'cpu', bytearray(b'1'), 0.5+0j, 1j]
EDGE_NUMBERS = [0, 1, 2, -1, 0.0, -0.0, 1.0, 0.5, 0.9998, 1-1e-17, 1-2**-53, 1+2**-52, 5e-324, 1e-300, 1e-16, 1e15, 1e16,
                1e300, -1e300, INF, -INF, NAN, HUGE, -HUGE, 2**63, 2**64-1, 10**308, 10**309, True, False]

NUMBERS = st.one_of(st.sampled_from(EDGE_NUMBERS), st.floats(), st.integers(), st.floats(0, 1), st.integers(-3, 5))
WRONG_TYPES = st.one_of(
    st.none(), st.text(max_size=6), st.binary(max_size=4), st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 1), max_size=2),
    st.complex_numbers(allow_nan=True, allow_infinity=True),
    st.sampled_from(NUMPY_VALUES), st.sampled_from(TORCH_VALUES), st.sampled_from(MISC_VALUES), st.sampled_from(ALL_DTYPES))
ANY = st.one_of(NUMBERS, st.booleans(), WRONG_TYPES)
DEVICES = st.one_of(st.sampled_from(DEVICE_STRINGS), st.sampled_from([torch.device(d) for d in ('cpu', 'meta', 'cuda')]),
                    st.text(max_size=8), st.from_regex(r'\A(cpu|cuda|meta|mps):-?[0-9]{1,3}\Z'), ANY)
DTYPES = st.one_of(st.sampled_from(ALL_DTYPES), st.sampled_from([np.float32, np.dtype('float32'), 'float32', float, 'torch.float32']), ANY)
NASTY_FORMS = [Const(None), Const('x'), Const('0.5'), Const(Decimal('0.5')), Const(Fraction(1, 2)), Const(np.array([0.5])),
             Const(np.array([0.5, 0.5])), Const(torch.tensor(0.5)), Const(torch.tensor([0.5])), Const(0.5+0j), Const(HUGE),
             Const(NAN), Const(INF), Const(1.0), Const(1.5), Const(-0.5), Const(True), Const(False), Const((0.5,)),
             EndsOk(1.5), EndsOk(-0.5), EndsOk(NAN), EndsOk(1.0), EndsOk('x'), EndsOk(None), EndsOk(Decimal('0.5')),
             NoArgs(), float, int, bool, complex, str, dict, list, torch.tensor, np.float64, max, min, pow, divmod, len]
GOOD_FORMS = [PowerDecay(), ThresholdDecay(), ExpDecay(), Const(0.5), Const(0.0), Const(np.float64(0.9)), Const(0), EndsOk(0.9)]
DECAY_FORMS = st.sampled_from(GOOD_FORMS + NASTY_FORMS)
SCHEDULES = st.sampled_from([
    SchedCos, SchedLin, SchedExp, SchedNo, SchedPoly, functools.partial(SchedPoly, power=2.), SCHED_BUMP, SCHED_NAN_MID,
    SCHED_INNER_NOARGS, SCHED_NOARGS, SchedConst(0.5), SchedConst(NAN), SchedConst(1.0), SchedConst(-1), SchedConst('x'),
    SchedConst('0.5'), SchedConst(None), SchedConst(HUGE), SchedConst(0.5+0j), SchedConst(np.array([0.5, 0.5])),
    SchedConst(torch.tensor(0.5)), SchedConst(Decimal('0.5')), SchedReturns(None), SchedReturns(0.5), SchedReturns('x'),
    int, float, str, dict, complex, max, divmod])


# ----------------------------------------------------------------------------- helpers

# Hypothesis writes caches (local constants, at collection; unicode data) under its home directory, `./.hypothesis` by
# default, even with `database=None`. They go to a temporary folder instead, from this module's import (collection comes
# after it) to the end of its tests, when the previous setting is restored and the folder removed.
import hypothesis.configuration as _hc
_TMP = tempfile.mkdtemp(prefix='fastxtend-ema-test-arguments-')   # also holds the Learners' paths
_HC_PREV = vars(_hc)['__hypothesis_home_directory']
_hc.set_hypothesis_home_dir(f'{_TMP}/hypothesis')

@pytest.fixture(autouse=True, scope='module')
def _hypothesis_storage_outside_repo():
    yield
    _hc.set_hypothesis_home_dir(_HC_PREV)
    shutil.rmtree(_TMP, ignore_errors=True)

def _names_arg(msg:str, name:str) -> bool:
    "`name` appears in `msg` as a whole identifier (`start` in 'start_decay' does not count)"
    return re.search(rf'(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])', msg) is not None

def check_exc(exc:BaseException, names, what:str):
    "`exc` must be a TypeError or ValueError whose message names one of `names`"
    names = (names,) if isinstance(names, str) else tuple(names)
    ok = isinstance(exc, (TypeError, ValueError)) and any(_names_arg(str(exc), n) for n in names)
    # chained to `exc`: hypothesis then tells different library failures apart, and reports each of them
    if not ok: raise AssertionError(f'{what}: got {type(exc).__name__}: {str(exc)[:300]!r}; '
                                    f'expected a TypeError or ValueError naming {" or ".join(names)}') from exc

_WATCHED = (Learner, EMACallback, EMASchedule, BEMACallback)

def construct(cls, kwargs:dict):
    "`(callback, None)` if `cls(**kwargs)` is accepted, else `(None, exception)`, checking a refusal leaves nothing behind"
    before = [dict(vars(c)) for c in _WATCHED]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return cls(**kwargs),None
    except Exception as e:
        after = [dict(vars(c)) for c in _WATCHED]
        changed = sorted(f'{c.__name__}.{k}' for c,b,a in zip(_WATCHED, before, after)
                         for k in b.keys()|a.keys() if b.get(k, ...) is not a.get(k, ...))
        if changed: raise AssertionError(f'{cls.__name__}(**{kwargs!r}) raised {type(e).__name__}: {e} but left behind '
                                         f'changed class attributes {changed}') from e
        return None,e

@contextmanager
def _rng_kept():
    "Python, NumPy and torch RNG states restored on exit (fastai's DataLoader draws from `random`)"
    py,npy,tch = random.getstate(),np.random.get_state(),torch.get_rng_state()
    try: yield
    finally: random.setstate(py); np.random.set_state(npy); torch.set_rng_state(tch)

class _DecayLog(Callback):
    "Records every decay the EMA callback applies"
    def __init__(self, cb):
        self.ema_cb,self.log,self.order = cb,[],cb.order+1
        self.n = [0]
    def after_batch(self):
        cb = self.ema_cb
        if cb.updates != self.n[0]:
            self.n[0] = cb.updates
            self.log.append(cb.last_decay)

def make_learner(cbs, n=32, bs=16, nf=4):
    with _rng_kept():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n + bs, nf, generator=g)
        y = x.sum(1, keepdim=True)
        items = [(x[i], y[i]) for i in range(len(x))]
        dls = DataLoaders(DataLoader(items[:n], bs=bs), DataLoader(items[n:], bs=bs), device='cpu')
        torch.manual_seed(1)   # restored on exit
        model = nn.Sequential(nn.Linear(nf, 8), nn.ReLU(), nn.Linear(8, 1))
        return Learner(dls, model, loss_func=MSELossFlat(), opt_func=SGD, lr=0.01, cbs=cbs, path=tempfile.mkdtemp(dir=_TMP))

def run_fit(cb, n_epoch=1):
    "A tiny quiet fit; returns the decays applied"
    log = _DecayLog(cb)
    learn = make_learner([cb, log])
    with _rng_kept(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch)
    return learn,log.log

def _is_decay(d) -> bool:
    "A number in [0, 1) (an int 0 or a 0-d tensor is fine; a string, NaN or 1.5 is not)"
    if isinstance(d, (str, bytes, complex)): return False
    try: return 0. <= float(d) < 1.
    except (TypeError, ValueError, OverflowError): return False

def check_value(cls, names, kwargs:dict, fit=False, n_epoch=1):
    "The contract, for one call: refused at construction naming the argument, or accepted and (with `fit`) a sound fit"
    call = f'{cls.__name__}(**{kwargs!r})'
    cb,exc = construct(cls, kwargs)
    if exc is not None: return check_exc(exc, names, f'{call} refused')
    if not fit: return cb
    try: learn,decays = run_fit(cb, n_epoch)
    except Exception as e: return check_exc(e, names, f'{call} accepted, then fit failed')
    bad = [d for d in decays if not _is_decay(d)]
    if bad: raise AssertionError(f'{call} accepted, then fit applied decays outside [0, 1) (or not numbers): {bad!r}')
    m = getattr(learn, 'model_ema', None)
    if isinstance(m, nn.Module):
        nonfinite = [n for n,t in m.state_dict().items() if t.is_floating_point() and not torch.isfinite(t.float()).all()]
        if nonfinite: raise AssertionError(f'{call} accepted, then fit left a non-finite EMA in {nonfinite}')
    return cb

BOTH = pytest.mark.parametrize('cls', [EMACallback, EMASchedule, BEMACallback])   # the arguments every EMA callback takes


# ----------------------------------------------------------------------------- decay (EMACallback only)

@CHEAP
@given(v=st.one_of(ANY, DECAY_FORMS))
@example(v=HUGE)
@example(v=1-1e-17)
@example(v=Fraction(HUGE, 1))
def test_decay_construct(v): check_value(EMACallback, 'decay', dict(decay=v))

@FITS
@given(v=st.one_of(st.floats(0, 1, exclude_max=True), DECAY_FORMS))
@example(v=Const(None)).via('decay form returning None')
@example(v=Const('x'))
@example(v=Const('0.5')).via('returns a str that float() accepts')
@example(v=Const(Decimal('0.5')))
@example(v=Const(np.array([0.5])))
@example(v=Const(torch.tensor([0.5])))
@example(v=Const(HUGE))
@example(v=EndsOk(1.5)).via('out of [0, 1) only between the first and last step')
@example(v=EndsOk(NAN))
@example(v=NoArgs())
@example(v=float).via('a type is callable')
@example(v=divmod)
def test_decay_fit(v): check_value(EMACallback, 'decay', dict(decay=v), fit=True, n_epoch=2)   # 4 steps: interior ones too

@pytest.mark.parametrize('v', [0.5, None, 0.9998, 'x'])
def test_schedule_refuses_decay_and_half_life(v):
    for k in ('decay', 'half_life'): check_value(EMASchedule, k, {k: v})
    check_value(EMACallback, ('decay', 'half_life'), dict(decay=0.5, half_life=10))


# ----------------------------------------------------------------------------- half_life (EMACallback only)

@CHEAP
@given(v=ANY)
@example(v=INF)
@example(v=1e300)
@example(v=1e16).via('0.5**(1/1e16) rounds to 1.0')
@example(v=HUGE)
@example(v=np.float64(INF))
@example(v=5e-324)
def test_half_life_construct(v): check_value(EMACallback, 'half_life', dict(half_life=v))

@FITS
@given(v=st.one_of(st.floats(min_value=5e-324, allow_infinity=True), st.integers(1, HUGE), st.sampled_from(EDGE_NUMBERS)))
@example(v=INF)
@example(v=1e300)
def test_half_life_fit(v): check_value(EMACallback, 'half_life', dict(half_life=v), fit=True)

@pytest.mark.parametrize('v', [INF, 1e300, 1e17])
def test_half_life_rounding_to_one_is_refused_naming_half_life(v):
    "Known case: the decay rounds to 1.0; the error must name half_life (today it names decay)"
    cb,exc = construct(EMACallback, dict(half_life=v))
    assert exc is not None, f'half_life={v} accepted'
    check_exc(exc, 'half_life', f'EMACallback(half_life={v!r}) refused')


# ----------------------------------------------------------------------------- start (both), finish (EMASchedule)

@BOTH
@CHEAP
@given(v=ANY)
@example(v=HUGE)
@example(v=10**309)
@example(v=1.0)
@example(v=1-1e-17)
def test_start_construct(cls, v): check_value(cls, 'start', dict(start=v))

@BOTH
@FITS
@given(v=st.one_of(st.integers(0, 3), st.integers(0, HUGE), st.floats(0, 1, exclude_max=True), st.sampled_from(EDGE_NUMBERS)))
@example(v=HUGE).via('int epoch too large for a float: OverflowError in before_fit')
@example(v=10**309)
@example(v=1)
@example(v=np.int64(1))
def test_start_fit(cls, v): check_value(cls, 'start', dict(start=v), fit=True)

@CHEAP
@given(v=ANY)
@example(v=2.0)
@example(v=HUGE)
def test_finish_construct(v): check_value(EMASchedule, 'finish', dict(finish=v))

@FITS
@given(v=st.one_of(st.integers(0, 3), st.integers(0, HUGE), st.floats(0, 1), st.sampled_from(EDGE_NUMBERS)),
       start=st.sampled_from([0, 0.0, 0.2, 1]))
@example(v=HUGE, start=0)
@example(v=0, start=0.2)
@example(v=0.1, start=0.2).via('refused naming start and finish, after the checkpoint hooks were installed')
def test_finish_fit(v, start): check_value(EMASchedule, ('finish', 'start'), dict(finish=v, start=start), fit=True)


# ----------------------------------------------------------------------------- ema_device (both)

@BOTH
@CHEAP
@given(v=DEVICES)
@example(v='meta')
@example(v='cuda:7')
@example(v='')
@example(v='cpu:-1')
def test_ema_device_construct(cls, v): check_value(cls, 'ema_device', dict(ema_device=v))

@BOTH
@FITS
@given(v=st.sampled_from(DEVICE_STRINGS + [None, torch.device('cpu'), torch.device('meta'), torch.device('cuda', 7)]))
@example(v='meta')
@example(v='cuda:7')
@example(v='cuda')
@example(v='mps')
@example(v='privateuseone')
@example(v='lazy')
def test_ema_device_fit(cls, v): check_value(cls, 'ema_device', dict(ema_device=v), fit=True)

@BOTH
@pytest.mark.parametrize('v', ['meta', 'cuda:7', torch.device('cuda', 7), 'mps'])
def test_unusable_ema_device_refused_at_construction(cls, v):
    "Known case: a device this machine cannot hold an EMA on is refused when the callback is made"
    d = torch.device(v)
    if d.type == 'cuda' and torch.cuda.device_count() > (d.index or 0): pytest.skip('this machine has that CUDA device')
    if d.type == 'mps' and torch.backends.mps.is_available(): pytest.skip('this machine has mps')
    cb,exc = construct(cls, dict(ema_device=v))
    assert exc is not None, f'{cls.__name__}(ema_device={v!r}) accepted on a machine that cannot use it'
    check_exc(exc, 'ema_device', f'{cls.__name__}(ema_device={v!r}) refused')
    assert isinstance(exc, ValueError), f'expected ValueError, got {type(exc).__name__}: {exc}'


# ----------------------------------------------------------------------------- ema_dtype (both)

@BOTH
@CHEAP
@given(v=DTYPES)
def test_ema_dtype_construct(cls, v): check_value(cls, 'ema_dtype', dict(ema_dtype=v))

@BOTH
@FITS
@given(v=st.sampled_from([None] + FLOAT_DTYPES + ALL_DTYPES))
@example(v=torch.float8_e4m3fn)
@example(v=torch.float4_e2m1fn_x2)
@example(v=torch.float16)
@example(v=torch.bfloat16)
@example(v=torch.float64)
def test_ema_dtype_fit(cls, v): check_value(cls, 'ema_dtype', dict(ema_dtype=v), fit=True)


# ----------------------------------------------------------------------------- validate_ema and the flags (both)

FLAGS = ['replace_weights', 'resume', 'all_parameters', 'all_buffers', 'skip_ema', 'foreach', 'ema_compile', 'switch']
FLAG_VALUES = st.one_of(st.booleans(), ANY, st.sampled_from(['both', 'True', 'true', 'BOTH', 0, 1, None]))

@BOTH
@CHEAP
@given(v=FLAG_VALUES)
@example(v=np.array([True, False])).via('numpy array: `!= "both"` is ambiguous')
@example(v=np.array([]))
@example(v=Weird())
def test_validate_ema_construct(cls, v): check_value(cls, 'validate_ema', dict(validate_ema=v))

@BOTH
@FITS
@given(v=st.sampled_from([True, False, 'both', None, 0, 1, np.bool_(True), torch.tensor(True)]))
def test_validate_ema_fit(cls, v): check_value(cls, 'validate_ema', dict(validate_ema=v), fit=True)

@BOTH
@CHEAP
@given(v=st.one_of(ANY, st.sampled_from(['model', 'dir', 'opt', 'recorder', 'a b', '', '1x', 'slow', 'ema2'])))
@example(v='model')
def test_name_construct(cls, v): check_value(cls, 'name', dict(name=v))

@BOTH
@pytest.mark.parametrize('name', FLAGS)
@CHEAP
@given(v=FLAG_VALUES)
@example(v=np.array([True, False]))
@example(v=Weird())
def test_flag_construct(cls, name, v): check_value(cls, name, {name: v})

@BOTH
@pytest.mark.parametrize('name', FLAGS)
@settings(FITS, max_examples=6)
@given(v=st.sampled_from([True, False, None, 0, 1, np.bool_(True)]))
@example(v=True)
@example(v=False)
def test_flag_fit(cls, name, v): check_value(cls, name, {name: v}, fit=True)


# ----------------------------------------------------------------------------- update_every (both)

@BOTH
@CHEAP
@given(v=ANY)
@example(v=HUGE)
@example(v=np.int64(2))
@example(v=2.0)
def test_update_every_construct(cls, v): check_value(cls, 'update_every', dict(update_every=v))

@BOTH
@FITS
@given(v=st.one_of(st.integers(-1, 4), st.integers(1, HUGE), st.sampled_from([np.int64(2), np.uint8(3), 2.0, True])))
@example(v=HUGE)
def test_update_every_fit(cls, v): check_value(cls, 'update_every', dict(update_every=v), fit=True)


# ----------------------------------------------------------------------------- start_decay, final_decay, schedule (EMASchedule)

@pytest.mark.parametrize('name', ['start_decay', 'final_decay'])
@CHEAP
@given(v=ANY)
@example(v=HUGE)
@example(v=1-1e-17)
def test_schedule_decays_construct(name, v): check_value(EMASchedule, name, {name: v})

@pytest.mark.parametrize('name', ['start_decay', 'final_decay'])
@FITS
@given(v=st.one_of(st.floats(0, 1, exclude_max=True), st.sampled_from([0, 0.0, 5e-324, 1-2**-53])),
       schedule=st.sampled_from([SchedCos, SchedLin, SchedExp, SchedNo]))
@example(v=0.0, schedule=SchedExp).via('SchedExp divides by start_decay')
def test_schedule_decays_fit(name, v, schedule):
    check_value(EMASchedule, (name, 'schedule'), {name: v, 'schedule': schedule}, fit=True)

@CHEAP
@given(v=st.one_of(SCHEDULES, ANY))
@example(v=SchedReturns(None))
def test_schedule_construct(v): check_value(EMASchedule, 'schedule', dict(schedule=v))

@FITS
@given(v=SCHEDULES, finish=st.sampled_from([0.3, 1.0, 1]))
@example(v=SchedReturns(None), finish=0.3)
@example(v=SchedPoly, finish=0.3).via('fastai annealer needing a third argument')
@example(v=SCHED_BUMP, finish=1.0).via('> 1 strictly between pos 0 and 1')
@example(v=SCHED_NAN_MID, finish=1.0)
@example(v=SchedConst('x'), finish=0.3)
@example(v=SchedConst(HUGE), finish=0.3)
@example(v=SCHED_NOARGS, finish=0.3)
@example(v=int, finish=0.3)
def test_schedule_fit(v, finish):
    check_value(EMASchedule, 'schedule', dict(schedule=v, finish=finish), fit=True, n_epoch=2)   # 4 steps: interior positions too

@pytest.mark.parametrize('v', [SchedReturns(None), SchedReturns(0.5), SchedReturns('x')])
def test_schedule_returning_non_callable_refused_at_construction(v):
    "Known case: `schedule(start_decay, final_decay)` is not a `pos -> decay` function"
    cb,exc = construct(EMASchedule, dict(schedule=v))
    assert exc is not None, f'EMASchedule(schedule={v!r}) accepted'
    check_exc(exc, 'schedule', f'EMASchedule(schedule={v!r}) refused')


# ----------------------------------------------------------------------------- BEMACallback's own arguments

BEMA_REALS = ['ema_power', 'bias_power', 'lag', 'multiplier', 'min_ema_multiplier']

@CHEAP
@given(v=ANY)
@pytest.mark.parametrize('name', BEMA_REALS)
def test_bema_construct(name, v): check_value(BEMACallback, name, {name: v})

@FITS
@given(v=st.one_of(NUMBERS, st.floats(0, 2)))
@example(v=1e300)   # lag or multiplier: the decay rounds to 1 at the fit's last step
@pytest.mark.parametrize('name', BEMA_REALS)
def test_bema_fit(name, v): check_value(BEMACallback, name, {name: v}, fit=True, n_epoch=2)

@pytest.mark.parametrize('lag,multiplier', [(0, 0.5), (0.2, 0.3), (0, 0)])
def test_bema_clock_must_start_at_one(lag, multiplier):
    "`lag + multiplier < 1` would make beta_t > 1 at t = 1: refused, naming both"
    cb,exc = construct(BEMACallback, dict(lag=lag, multiplier=multiplier))
    assert exc is not None and _names_arg(str(exc), 'lag') and _names_arg(str(exc), 'multiplier'), exc

def test_bema_refuses_decay_and_half_life():
    for k in ('decay', 'half_life'): check_value(BEMACallback, k, {k: 0.5})


# ----------------------------------------------------------------------------- every defect the properties found, one test each

E, S = EMACallback, EMASchedule
FOUND = [   # (id, class, kwargs, argument names the error may name, epochs of the fit)
    ('decay=10**400', E, dict(decay=HUGE), 'decay', 1),
    ('decay=Fraction(10**400)', E, dict(decay=Fraction(HUGE, 1)), 'decay', 1),
    ('decay=float', E, dict(decay=float), 'decay', 1),
    ('decay=divmod', E, dict(decay=divmod), 'decay', 1),
    ('decay=NoArgs', E, dict(decay=NoArgs()), 'decay', 1),
    ('decay=Const(None)', E, dict(decay=Const(None)), 'decay', 1),
    ('decay=Const(x)', E, dict(decay=Const('x')), 'decay', 1),
    ('decay=Const(0.5str)', E, dict(decay=Const('0.5')), 'decay', 1),
    ('decay=Const(Decimal)', E, dict(decay=Const(Decimal('0.5'))), 'decay', 1),
    ('decay=Const(ndarray[1])', E, dict(decay=Const(np.array([0.5]))), 'decay', 1),
    ('decay=Const(tensor[1])', E, dict(decay=Const(torch.tensor([0.5]))), 'decay', 1),
    ('decay=Const(complex)', E, dict(decay=Const(0.5+0j)), 'decay', 1),
    ('decay=Const(10**400)', E, dict(decay=Const(HUGE)), 'decay', 1),
    ('decay=EndsOk(1.5)', E, dict(decay=EndsOk(1.5)), 'decay', 2),
    ('decay=EndsOk(nan)', E, dict(decay=EndsOk(NAN)), 'decay', 2),
    ('half_life=inf', E, dict(half_life=INF), 'half_life', 1),
    ('half_life=1e300', E, dict(half_life=1e300), 'half_life', 1),
    ('half_life=1e17', E, dict(half_life=1e17), 'half_life', 1),
    ('half_life=10**400', E, dict(half_life=HUGE), 'half_life', 1),
    ('start=10**309-EMACallback', E, dict(start=10**309), 'start', 1),
    ('start=10**309-EMASchedule', S, dict(start=10**309, finish=10**309), 'start', 1),
    ('start=0.5-EMASchedule', S, dict(start=0.5), 'start', 1),
    ('finish=2.0', S, dict(finish=2.0), 'finish', 1),
    ('finish=0.1,start=0.2', S, dict(finish=0.1, start=0.2), ('finish', 'start'), 1),
    ('finish=10**309', S, dict(finish=10**309), 'finish', 1),
    *[(f'ema_device={d}-{c.__name__}', c, dict(ema_device=d), 'ema_device', 1) for c in (E, S)
      for d in ('meta', 'cuda:7', 'cuda', 'mps', 'xpu', 'privateuseone', 'lazy')],
    *[(f'ema_dtype={str(d)[6:]}-{c.__name__}', c, dict(ema_dtype=d), 'ema_dtype', 1) for c in (E, S)
      for d in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2)],
    *[(f'validate_ema={n}-{c.__name__}', c, dict(validate_ema=v), 'validate_ema', 1) for c in (E, S)
      for n,v in (('ndarray[2]', np.array([True, False])), ('ndarray[0]', np.array([])), ('Weird', Weird()))],
    ('start_decay=10**400', S, dict(start_decay=HUGE), 'start_decay', 1),
    ('final_decay=10**400', S, dict(final_decay=HUGE), 'final_decay', 1),
    ('start_decay=0,schedule=SchedExp', S, dict(start_decay=0.0, schedule=SchedExp), ('start_decay', 'schedule'), 1),
    ('schedule=0', S, dict(schedule=0), 'schedule', 1),
    ('schedule=SchedReturns(None)', S, dict(schedule=SchedReturns(None)), 'schedule', 1),
    ('schedule=SchedPoly', S, dict(schedule=SchedPoly), 'schedule', 1),
    ('schedule=int', S, dict(schedule=int), 'schedule', 1),
    ('schedule=SchedNoArgs', S, dict(schedule=SCHED_NOARGS), 'schedule', 1),
    ('schedule=SchedInnerNoArgs', S, dict(schedule=SCHED_INNER_NOARGS), 'schedule', 1),
    ('schedule=SchedConst(x)', S, dict(schedule=SchedConst('x')), 'schedule', 1),
    ('schedule=SchedConst(10**400)', S, dict(schedule=SchedConst(HUGE)), 'schedule', 1),
    ('schedule=SchedConst(ndarray[2])', S, dict(schedule=SchedConst(np.array([0.5, 0.5]))), 'schedule', 1),
    ('schedule=SchedBump,finish=1.0', S, dict(schedule=SCHED_BUMP, finish=1.0), 'schedule', 2),
    ('schedule=SchedNaNMid,finish=1.0', S, dict(schedule=SCHED_NAN_MID, finish=1.0), 'schedule', 2),
]

@pytest.mark.parametrize('cls,kwargs,names,n_epoch', [pytest.param(*c[1:], id=c[0]) for c in FOUND])
def test_found(cls, kwargs, names, n_epoch): check_value(cls, names, kwargs, fit=True, n_epoch=n_epoch)


# ----------------------------------------------------------------------------- the harness itself

def test_helpers():
    "The harness: argument-name matching, the exception check, leftover detection, the fit and its decay log"
    assert _names_arg('start (1) is after finish', 'start') and not _names_arg('start_decay must be', 'start')
    assert _names_arg("decay(1, 2) must be in [0, 1)", 'decay') and not _names_arg('final_decay must be', 'decay')
    check_exc(TypeError('ema_device must be a torch.device'), 'ema_device', 'x')
    with pytest.raises(AssertionError): check_exc(RuntimeError('ema_device'), 'ema_device', 'x')
    with pytest.raises(AssertionError): check_exc(ValueError('decay must be in [0, 1)'), 'half_life', 'x')
    save = Learner.__dict__['save']
    class Leaky:
        def __init__(self): Learner.save = None; raise ValueError('leaky')
    try:
        with pytest.raises(AssertionError, match='left behind'): construct(Leaky, {})
    finally: Learner.save = save
    cb,exc = construct(EMACallback, dict(decay=0.5))
    assert exc is None and cb.decay == 0.5 and Learner.__dict__['save'] is save
    py,tch,nthreads,nactive = random.getstate(),torch.get_rng_state(),torch.get_num_threads(),threading.active_count()
    learn,decays = run_fit(cb)
    assert decays == [0.5, 0.5] and isinstance(learn.model_ema, nn.Module)
    assert random.getstate() == py and torch.equal(torch.get_rng_state(), tch)
    assert torch.get_num_threads() == nthreads and threading.active_count() == nactive


def test_every_argument_is_covered():
    "A new constructor argument cannot slip past this file"
    import inspect
    src = open(__file__).read()
    tested = set(re.findall(r"check_value\(\w+, \(?'(\w+)'", src)) | set(FLAGS)
    tested |= set(re.findall(r"parametrize\('name', \[(.*?)\]", src)[0].replace("'", '').replace(' ', '').split(','))
    tested |= set(BEMA_REALS)
    for cls in (EMACallback, EMASchedule, BEMACallback):
        missing = set(inspect.signature(cls).parameters) - tested - {'kwargs'}
        assert not missing, (cls.__name__, missing)

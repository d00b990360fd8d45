"""An interrupted save loses nothing (issue 20), and each checkpoint holder has a file of its own (issue 17).

* A save is interrupted while it writes each file (a `torch.save` that writes half of its bytes where the file goes,
  then raises `KeyboardInterrupt`, as a preemption does), and before and after it moves each file into place (an
  `os.replace` that raises on its k-th call). After each, a fresh Learner's `learn.load` gives the previous
  checkpoint or the new one, whole (model, optimizer, EMA, post-hoc tracking, counters), never a mix and without a
  warning, and a following `fit` runs exactly as the same fit from an uninterrupted copy of that checkpoint. The next
  save leaves no temporary or `.prev` file, and two interruptions in a row still leave one whole checkpoint.
* A save that fails with an error (not a kill) puts the previous checkpoint back and leaves no file over.
* A damaged EMA file names `learn.load(name, with_ema=False)`, which loads the model and starts the EMA anew.
* Two holders with one suffix are refused at save and load, naming both; with suffixes of their own, both round-trip.
* The model file holds what fastai's holds (not byte for byte: torch names the zip's folder after the file). The EMA
  file loads with a bare `torch.load(weights_only=True)`; fastai's file needs its allow-list (`read_file`).
"""
import contextlib, io, os, pickle, warnings
from pathlib import Path
import pytest
import torch
from torch import Tensor
from fastcore.foundation import L
from fastai.learner import Learner
from fastxtend_ema.callback import EMACallback, EMAHorizonWarning
from fastxtend_ema.posthoc import PostHocEMA
from fastxtend_ema.checkpoint import CheckpointHolder, checkpoint_holders, read_file
from fastxtend_ema.test_utils import synth_learner, fit_quiet

pytestmark = pytest.mark.filterwarnings('ignore::fastxtend_ema.callback.EMAHorizonWarning')

SETUPS = {'ema': lambda: [EMACallback(decay=0.8)],
          'ema+posthoc': lambda: [EMACallback(decay=0.8), PostHocEMA(snapshot_every=2)]}

def learner(kind:str, path) -> Learner: return synth_learner(cbs=SETUPS[kind](), path=path)

def same(a, b) -> bool:
    "Equal structure, equal values, tensors bit for bit"
    if isinstance(a, Tensor): return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, L)):
        return isinstance(b, (list, tuple, L)) and len(a) == len(b) and all(same(x, y) for x,y in zip(a, b))
    return a == b

def state_of(learn:Learner) -> dict:
    "Everything a checkpoint restores: model, optimizer, and each holder's state with its counters"
    return dict(model=learn.model.state_dict(), opt=learn.opt.state_dict(),
                holders={h.checkpoint_suffix: h.checkpoint_state() for h in checkpoint_holders(learn)})

def files(learn:Learner) -> list[str]: return sorted(p.name for p in (learn.path/learn.model_dir).glob('*.pth*'))
def hidden(learn:Learner) -> list[str]: return [f for f in files(learn) if f.startswith('.')]

# ----------------------------------------------------------------------------- interruptions
def half_save(k:int):
    "A `torch.save` whose k-th call writes half of its bytes where the file goes, then is killed"
    real, calls = torch.save, [0]
    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != k: return real(obj, f, *args, **kwargs)
        buf = io.BytesIO(); real(obj, buf, *args, **kwargs)
        part = buf.getvalue()[:len(buf.getvalue())//2]
        if hasattr(f, 'write'): f.write(part); f.flush()
        else: Path(f).write_bytes(part)
        raise KeyboardInterrupt
    return save

def cut_replace(k:int, after:bool, exc=KeyboardInterrupt):
    "An `os.replace` whose k-th call is killed before it moves the file, or right after"
    real, calls = os.replace, [0]
    def replace(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and not after: raise exc('interrupted')
        real(*args, **kwargs)
        if calls[0] == k: raise exc('interrupted')
    return replace

def count_calls(monkeypatch, module, name):
    real, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls

def trained(kind, path):
    "A Learner saved as `ck` and `old` after one epoch, and as `new` after two: `ck` is saved again next"
    learn = fit_quiet(learner(kind, path), 1)
    learn.save('ck'); learn.save('old')
    fit_quiet(learn, 1)
    learn.save('new')
    return learn

def assert_loads_as(kind, path, expected:str, other:str, fit:bool=True):
    "A fresh Learner loads `ck` as the checkpoint `expected`, not `other`, without a warning; and fits on exactly as it"
    got, ref, alt = learner(kind, path), learner(kind, path), learner(kind, path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        got.load('ck')
    assert not [o for o in w if 'EMA' in str(o.message)], [str(o.message) for o in w]
    ref.load(expected); alt.load(other)
    assert same(state_of(got), state_of(ref)), f'ck does not load as {expected}'
    assert not same(state_of(got), state_of(alt))   # the two checkpoints differ: the comparison tells them apart
    if not fit: return
    fit_quiet(got, 1); fit_quiet(ref, 1)
    assert same(state_of(got), state_of(ref)), f'the fit from ck does not run as the fit from {expected}'

N_HOLDERS = {k: len(v()) for k,v in SETUPS.items()}
# killed right after the k-th move is killed right before the (k+1)-th: the last move (the commit) is the one case more
CASES = ([(kind, 'write', k, False) for kind in SETUPS for k in range(1, N_HOLDERS[kind] + 2)] +
         [(kind, 'move', k, False) for kind in SETUPS for k in range(1, 2*N_HOLDERS[kind] + 2)] +
         [(kind, 'move', 2*N_HOLDERS[kind] + 1, True) for kind in SETUPS])

@pytest.mark.parametrize('kind,what,k,after', CASES, ids=[f'{c[0]}-{c[1]}{c[2]}{"-after" if c[3] else ""}' for c in CASES])
def test_interrupted_save_loads_whole(kind, what, k, after, tmp_path, monkeypatch):
    learn = trained(kind, tmp_path)
    n_files, n_moves = N_HOLDERS[kind] + 1, 2*N_HOLDERS[kind] + 1   # temporary files; each holder moved aside then in, the model
    with monkeypatch.context() as m:   # the protocol these cases cover: a save of `ck` over an existing one
        saves, moves = count_calls(m, torch, 'save'), count_calls(m, os, 'replace')
        learn.save('again'); learn.save('again')
        assert (len(saves), len(moves)) == (2*n_files, N_HOLDERS[kind] + 1 + n_moves)
    with monkeypatch.context() as m:
        if what == 'write': m.setattr(torch, 'save', half_save(k))
        else: m.setattr(os, 'replace', cut_replace(k, after))
        with pytest.raises(KeyboardInterrupt): learn.save('ck')
    committed = what == 'move' and after and k == n_moves   # killed right after the model file was moved into place
    assert hidden(learn), 'an interrupted save leaves its temporary files (the next save clears them)'
    assert_loads_as(kind, tmp_path, 'new' if committed else 'old', 'old' if committed else 'new')
    learn.save('ck')   # the next save completes: it clears what the interrupted one left
    assert not hidden(learn), hidden(learn)
    assert_loads_as(kind, tmp_path, 'new', 'old', fit=False)

@pytest.mark.parametrize('kind', list(SETUPS))
@pytest.mark.parametrize('committed', [False, True], ids=['before-commit', 'after-commit'])
def test_two_interruptions_in_a_row(kind, committed, tmp_path, monkeypatch):
    "A save killed while it writes, after one killed before (or right after) its commit: still one whole checkpoint"
    learn = trained(kind, tmp_path)
    n_moves = 2*N_HOLDERS[kind] + 1
    with monkeypatch.context() as m:   # killed after the first holder's new file is in place, or after the commit
        m.setattr(os, 'replace', cut_replace(n_moves if committed else 2, after=committed))
        with pytest.raises(KeyboardInterrupt): learn.save('ck')
    with monkeypatch.context() as m:
        m.setattr(torch, 'save', half_save(1))
        with pytest.raises(KeyboardInterrupt): learn.save('ck')
    assert_loads_as(kind, tmp_path, 'new' if committed else 'old', 'old' if committed else 'new')

def test_first_save_interrupted_leaves_no_checkpoint(tmp_path, monkeypatch):
    learn = fit_quiet(learner('ema', tmp_path), 1)
    with monkeypatch.context() as m:
        m.setattr(os, 'replace', cut_replace(1, False))
        with pytest.raises(KeyboardInterrupt): learn.save('ck')
    assert not (tmp_path/'models'/'ck.pth').exists() and not (tmp_path/'models'/'ck.ema.pth').exists()
    with pytest.raises(ValueError, match='ck.pth'): learner('ema', tmp_path).load('ck')
    learn.save('ck')
    assert files(learn) == ['ck.ema.pth', 'ck.pth']

@pytest.mark.parametrize('k', [1, 2, 3])
def test_failed_save_puts_the_previous_checkpoint_back(k, tmp_path, monkeypatch):
    "An error (a full disk), not a kill: the save raises it, and the folder holds the previous checkpoint and nothing else"
    learn = trained('ema', tmp_path)
    with monkeypatch.context() as m:
        m.setattr(os, 'replace', cut_replace(k, False, OSError))
        with pytest.raises(OSError): learn.save('ck')
    assert not hidden(learn), hidden(learn)
    assert_loads_as('ema', tmp_path, 'old', 'new')

def test_successful_save_leaves_only_its_files(tmp_path):
    learn = fit_quiet(learner('ema+posthoc', tmp_path), 1)
    for _ in range(2): learn.save('ck')
    assert files(learn) == ['ck.ema.pth', 'ck.posthoc.pth', 'ck.pth']

def learner_loaded(kind, path, name) -> Learner:
    learn = learner(kind, path); learn.load(name)
    return learn

# ----------------------------------------------------------------------------- a damaged EMA file: the way on
def test_damaged_ema_file_names_the_way_on(tmp_path):
    learn = trained('ema', tmp_path)
    f = tmp_path/'models'/'ck.ema.pth'
    f.write_bytes(f.read_bytes()[:200])
    fresh = learner('ema', tmp_path)
    with pytest.raises(ValueError) as e: fresh.load('ck')
    assert 'ck.ema.pth' in str(e.value) and "learn.load('ck', with_ema=False)" in str(e.value), str(e.value)
    with pytest.warns(UserWarning, match=r'with_ema=False\): EMACallback start anew'): fresh.load('ck', with_ema=False)
    assert same(fresh.model.state_dict(), learner_loaded('ema', tmp_path, 'old').model.state_dict())
    fit_quiet(fresh, 1)
    assert fresh.ema.averager.steps == len(fresh.dls.train)   # the EMA started anew with this fit
    # in the middle of a training, too: the running EMA starts anew
    with pytest.warns(UserWarning, match='with_ema=False'): learn.load('ck', with_ema=False)
    fit_quiet(learn, 1)
    assert learn.ema.averager.steps == len(learn.dls.train)

# ----------------------------------------------------------------------------- one file per holder
class EMA2(EMACallback): "A second EMA callback, as the tests of several holders need it"

def test_holders_sharing_a_suffix_are_refused(tmp_path):
    with pytest.raises(ValueError, match='would both write'): synth_learner(cbs=[EMACallback(decay=0.8), EMA2(decay=0.5, validate_ema=False)])
    learn = fit_quiet(synth_learner(cbs=[EMACallback(decay=0.8), EMA2(decay=0.5, name='ema2', validate_ema=False)], path=tmp_path), 1)
    learn.save('ck')
    learn.ema2.__dict__['_name'] = None   # changed behind the registry's back: save and load refuse all the same
    msg = r'EMACallback \(learn.cbs\[\d\]\) and EMA2 \(learn.cbs\[\d\]\) would both write ck.ema.pth'
    before = files(learn)
    with pytest.raises(ValueError, match=msg): learn.save('ck')
    assert files(learn) == before
    with pytest.raises(ValueError, match=msg): learn.load('ck')
    bad = synth_learner(cbs=[EMACallback(decay=0.8)], path=tmp_path)
    bad.ema.__dict__['_name'] = 'a/b'
    with pytest.raises(ValueError, match=r"EMACallback \(learn.cbs\[\d\]\) has checkpoint_suffix 'a/b'"): bad.save('x')

def test_each_holder_round_trips_its_own_file(tmp_path):
    def make():
        return synth_learner(cbs=[EMACallback(decay=0.8), EMA2(decay=0.5, name='ema2', validate_ema=False), PostHocEMA(snapshot_every=2)], path=tmp_path)
    learn = fit_quiet(make(), 2)
    learn.save('ck')
    assert files(learn) == ['ck.ema.pth', 'ck.ema2.pth', 'ck.posthoc.pth', 'ck.pth']
    back = make(); back.load('ck')
    assert same(state_of(back), state_of(learn))
    a, b, _ = state_of(back)['holders'].values()
    assert not same(a['tensors'], b['tensors'])   # two EMAs, each in its own file

class Epochs(CheckpointHolder):
    "Counts the epochs trained, across saves: the smallest checkpoint holder (nothing to save before the first epoch)"
    def __init__(self): self.checkpoint_suffix, self.n = 'epochs', 0
    def after_epoch(self): self.n += 1
    def checkpoint_state(self): return {'n': self.n} if self.n else None
    def load_checkpoint_state(self, state): self.n = 0 if state is None else state['n']

def test_contract_on_the_base_class(tmp_path, monkeypatch):
    learn = fit_quiet(synth_learner(cbs=Epochs(), path=tmp_path), 2)
    assert checkpoint_holders(learn) == [learn.epochs] and 'save' in learn.__dict__
    learn.save('ck')
    back = synth_learner(cbs=Epochs(), path=tmp_path); back.load('ck')
    assert back.epochs.n == 2
    fit_quiet(learn, 1)
    with monkeypatch.context() as m:
        m.setattr(os, 'replace', cut_replace(3, False))   # the commit
        with pytest.raises(KeyboardInterrupt): learn.save('ck')
    back.load('ck'); assert back.epochs.n == 2
    learn.save('ck'); back.load('ck'); assert back.epochs.n == 3
    learn.remove_cb(learn.epochs)
    assert 'save' not in learn.__dict__ and 'load' not in learn.__dict__   # fastai's own again
    # a holder with nothing to save: its old file goes, at the commit and not before
    learn = fit_quiet(synth_learner(cbs=Epochs(), path=tmp_path), 1)
    learn.save('ck'); learn.epochs.n = 0
    with monkeypatch.context() as m:
        m.setattr(os, 'replace', cut_replace(2, False))   # the commit: the holder's file was moved aside
        with pytest.raises(KeyboardInterrupt): learn.save('ck')
    back.load('ck'); assert back.epochs.n == 1
    learn.save('ck')
    assert files(learn) == ['ck.pth']
    with pytest.warns(UserWarning, match=r'has no EMA state for Epochs \(ck.epochs.pth not found\)'): back.load('ck')
    assert back.epochs.n == 0
    class NoState(CheckpointHolder): checkpoint_suffix = 'none'
    with pytest.raises(NotImplementedError, match='NoState must define checkpoint_state'):
        synth_learner(cbs=NoState(), path=tmp_path).save('n')
    assert not (tmp_path/'models'/'n.pth').exists()

# ----------------------------------------------------------------------------- the files themselves
def test_model_file_is_fastais_own(tmp_path):
    learn = fit_quiet(learner('ema', tmp_path), 1)
    for with_opt in (True, False):
        learn.save('ours', with_opt=with_opt)
        Learner.save(learn, 'fastais', with_opt=with_opt)
        assert same(read_file(tmp_path/'models'/'ours.pth'), read_file(tmp_path/'models'/'fastais.pth'))

def test_which_files_load_with_weights_only(tmp_path):
    "The claim of 04_checkpoint: the EMA file loads bare with `weights_only=True`; fastai's file needs its allow-list"
    learn = fit_quiet(learner('ema', tmp_path), 1)
    learn.save('ck')
    d = tmp_path/'models'
    st = torch.load(d/'ck.ema.pth', weights_only=True)
    assert {'tensors', 'steps', 'checkpoint'} <= set(st)
    with pytest.raises(pickle.UnpicklingError, match='fastcore.foundation.L'): torch.load(d/'ck.pth', weights_only=True)
    assert set(read_file(d/'ck.pth')) == {'model', 'opt'}
    learn.save('bare', with_opt=False)   # without the optimizer, fastai's file is a plain state dict
    assert set(torch.load(d/'bare.pth', weights_only=True)) == set(learn.model.state_dict())

"""Post-hoc EMA with a bias correction (`PostHocEMA.synthesize(bias=...)`, `sweep(biases=...)`): theta_0 and the
training weights kept beside the snapshots, the formula checked against the stored tensors, the sweep's table and figure"""
import io, shutil
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.tracker import SaveModelCallback
from fastai.metrics import mae

from fastxtend_ema.checkpoint import read_file
from fastxtend_ema.posthoc import PostHocEMA, THETA_0
from fastxtend_ema.test_utils import synth_learner, synth_model, fit_quiet, valid_loss

def tracked(tmp_path, n_epoch=3, name='run', **kwargs):
    "A tiny fit with `PostHocEMA` (6 batches an epoch), its snapshots under `tmp_path/name`"
    learn = synth_learner(cbs=PostHocEMA(snapshot_every=5, **kwargs), lr=0.1, path=tmp_path/name)
    fit_quiet(learn, n_epoch)
    return learn

def todays_synthesize(cb, sigma_rel, at=None):
    "`synthesize` as it was before the bias: the snapshots summed in float64 with `coefficients`, cast to the EMA module"
    snaps, x = cb.coefficients(sigma_rel, at)
    acc = {}
    for (_, name), coefs in zip(snaps, x):
        last = torch.load(cb.path/name, weights_only=True)
        for c, tensors in zip(coefs, last['tensors']):
            for n, v in tensors.items():
                if v.is_floating_point(): acc[n] = acc[n] + float(c)*v.double() if n in acc else float(c)*v.double()
    return acc, last

def floats(m): return {n: v for n, v in m.state_dict().items() if v.is_floating_point()}

def test_bias_zero_is_todays_synthesize_bit_for_bit(tmp_path):
    learn = tracked(tmp_path)
    cb = learn.post_hoc_ema
    for s, at in ((0.05, None), (0.13, None), (0.1, cb.snapshots[1][0]), (0.2, cb.snapshots[2][0])):
        acc, last = todays_synthesize(cb, s, at)
        ref = synth_model()
        ref.load_state_dict({n: acc.get(n, v) for n, v in last['tensors'][0].items()})
        for m in (cb.synthesize(s, at), cb.synthesize(s, at, bias=0.), cb.synthesize(s, at, bias=0)):
            for n, v in ref.state_dict().items(): assert torch.equal(m.state_dict()[n], v), (s, at, n)
    # bias=0 reads neither theta_0 nor the training weights: it works where they are gone
    (cb.path/THETA_0).unlink()
    m = cb.synthesize(0.13, bias=0.)
    acc, _ = todays_synthesize(cb, 0.13)
    assert torch.equal(m[0].weight, acc['0.weight'].float())

def test_bias_is_the_formula_on_the_stored_tensors(tmp_path):
    learn = tracked(tmp_path)
    cb = learn.post_hoc_ema
    theta_0 = torch.load(cb.path/THETA_0, weights_only=True)['tensors']
    start = synth_model().state_dict()   # the tracking began with the model's initial weights
    assert all(torch.equal(theta_0[n], v) for n, v in start.items())
    t_last, last = cb.snapshots[-1]
    raw = torch.load(cb.path/last, weights_only=True)
    assert raw['raw_t'] == t_last == 18 and all(torch.equal(raw['raw'][n], v) for n, v in learn.model.state_dict().items())
    for s, alpha, at in ((0.1, 0.3, None), (0.05, -0.7, None), (0.2, 2.5, cb.snapshots[1][0])):
        snap = torch.load(cb.path/dict(cb.snapshots)[at or t_last], weights_only=True)
        acc, _ = todays_synthesize(cb, s, at)
        m = cb.synthesize(s, at, bias=alpha)
        diff = 0.
        for n, v in floats(m).items():
            want = acc[n] + alpha*(snap['raw'][n].double() - theta_0[n].double())
            assert v.dtype == torch.float32
            torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-7)
            diff = max(diff, (v.double() - acc[n]).abs().max().item())
        assert diff > 1e-3, 'the bias changed nothing: the check above could not fail'

def test_bias_on_a_bf16_model_is_float32(tmp_path):
    from fastai.callback.core import Callback
    class BF16Batches(Callback):
        order = -5
        def before_batch(self):
            self.learn.xb = tuple(x.bfloat16() for x in self.xb); self.learn.yb = tuple(y.bfloat16() for y in self.yb)
    learn = synth_learner(cbs=[BF16Batches(), PostHocEMA(snapshot_every=5)], model=synth_model().bfloat16(), path=tmp_path)
    fit_quiet(learn, 1)
    cb = learn.post_hoc_ema
    theta_0 = torch.load(cb.path/THETA_0, weights_only=True)['tensors']
    raw = torch.load(cb.path/cb.snapshots[-1][1], weights_only=True)['raw']
    assert theta_0['0.weight'].dtype == raw['0.weight'].dtype == torch.float32   # bf16 weights, exactly, in float32
    assert torch.equal(raw['0.weight'], learn.model[0].weight.float())
    acc, _ = todays_synthesize(cb, 0.1)
    m = cb.synthesize(0.1, bias=0.4)
    assert m[0].weight.dtype == torch.float32
    torch.testing.assert_close(m[0].weight.double(), acc['0.weight'] + 0.4*(raw['0.weight'].double() - theta_0['0.weight'].double()),
                               rtol=1e-6, atol=1e-7)

def test_theta_0_survives_save_load_and_resume(tmp_path):
    a = synth_learner(cbs=PostHocEMA(snapshot_every=4), lr=0.1, path=tmp_path/'a')
    fit_quiet(a, 4, cbs=SaveModelCallback(every_epoch=True))
    want = floats(a.post_hoc_ema.synthesize(0.1, bias=0.3))
    # save/load in the same folder: a new Learner continues the tracking, theta_0 included
    a.save('end')
    c = synth_learner(cbs=PostHocEMA(snapshot_every=4), lr=0.1, path=tmp_path/'a')
    c.load('end')
    assert all(torch.equal(v, want[n]) for n, v in floats(c.post_hoc_ema.synthesize(0.1, bias=0.3)).items())
    # resume from epoch 1 in another folder, with the snapshots written until then, and with or without theta_0.pt
    for copy_theta_0 in (True, False):
        b = synth_learner(cbs=PostHocEMA(snapshot_every=4), lr=0.1, path=tmp_path/f'b{copy_theta_0}')
        (b.path/'models'/'posthoc').mkdir(parents=True)
        for f in ('model_1.pth', 'model_1.posthoc.pth'): shutil.copy(a.path/'models'/f, b.path/'models'/f)
        state = torch.load(a.path/'models/model_1.posthoc.pth', weights_only=True)
        names = [n for _, n in state['snapshots']] + [THETA_0]*copy_theta_0
        for n in names: shutil.copy(a.path/'models/posthoc'/n, b.path/'models/posthoc'/n)
        b.load('model_1', with_opt=False)
        fit_quiet(b, 4, start_epoch=2)
        assert b.post_hoc_ema.snapshots == a.post_hoc_ema.snapshots
        if copy_theta_0:
            got = floats(b.post_hoc_ema.synthesize(0.1, bias=0.3))
            assert all(torch.equal(v, want[n]) for n, v in got.items())
        else:   # a resumed tracking never writes the weights it resumes from as theta_0
            assert not (b.post_hoc_ema.path/THETA_0).exists()
            with pytest.raises(ValueError, match='theta_0'): b.post_hoc_ema.synthesize(0.1, bias=0.3)
            b.post_hoc_ema.synthesize(0.1)   # without a bias it needs only the snapshots

def test_old_snapshots_load_and_refuse_a_bias(tmp_path):
    learn = tracked(tmp_path, keep_raw=False)
    cb = learn.post_hoc_ema
    assert not (cb.path/THETA_0).exists() and torch.load(cb.path/cb.snapshots[-1][1], weights_only=True)['raw'] is None
    with pytest.raises(ValueError, match='bias needs the training weights.*keep_raw=True'): cb.synthesize(0.1, bias=0.2)
    # a folder of an earlier version: snapshots of format 1, no training weights in them, no theta_0.pt
    learn = tracked(tmp_path, name='old')
    cb = learn.post_hoc_ema
    for _, n in cb.snapshots:
        s = torch.load(cb.path/n, weights_only=True)
        torch.save(dict(format=1, t=s['t'], sigma_rels=s['sigma_rels'], gammas=s['gammas'], tensors=s['tensors']), cb.path/n)
    want = floats(cb.synthesize(0.1))
    learn.save('old')
    fresh = synth_learner(cbs=PostHocEMA(snapshot_every=5), path=tmp_path/'old')
    fresh.load('old')
    assert all(torch.equal(v, want[n]) for n, v in floats(fresh.post_hoc_ema.synthesize(0.1)).items())
    with pytest.raises(ValueError, match='bias needs the training weights'): fresh.post_hoc_ema.synthesize(0.1, bias=0.2)
    # training weights in the snapshots, theta_0.pt gone: the error names the file
    learn = tracked(tmp_path, name='lost')
    (learn.post_hoc_ema.path/THETA_0).unlink()
    with pytest.raises(ValueError, match=r'bias needs theta_0.*lost/models/posthoc/theta_0\.pt'):
        learn.post_hoc_ema.synthesize(0.1, bias=0.2)

def test_bad_arguments_are_named(tmp_path):
    learn = tracked(tmp_path)
    cb = learn.post_hoc_ema
    for bad in ('0.1', None, True, [0.1], torch.tensor(0.1)):
        with pytest.raises(TypeError, match='bias must be a real number'): cb.synthesize(0.1, bias=bad)
    for bad in (float('nan'), float('inf'), -float('inf'), np.float64('nan')):
        with pytest.raises(ValueError, match='bias must be finite'): cb.synthesize(0.1, bias=bad)
    with pytest.raises(TypeError, match='keep_raw'): PostHocEMA(keep_raw='yes')
    before = {n: v.clone() for n, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='bias must be finite'): cb.sweep([0.1], biases=(0., float('nan')), ax=False)
    with pytest.raises(TypeError, match='bias must be a real number'): cb.sweep([0.1], biases='0.1', ax=False)
    with pytest.raises(ValueError, match='biases'): cb.sweep([0.1], biases=(), ax=False)
    with pytest.raises(TypeError, match='bias must be a real number, got None'): cb.sweep([0.1], biases=None, ax=False)
    with pytest.raises(ValueError, match='sigma_rel must be in'): cb.sweep([0.1, 0.5], ax=False)   # before any validation
    assert all(torch.equal(v, before[n]) for n, v in learn.model.state_dict().items())
    assert not hasattr(learn, 'model_ema')

def test_sweep_is_a_table_with_the_best_row_marked(tmp_path):
    learn = synth_learner(cbs=PostHocEMA(snapshot_every=5), lr=0.1, metrics=mae, path=tmp_path)
    fit_quiet(learn, 3)
    cb = learn.post_hoc_ema
    sigmas, biases = [0.05, 0.1, 0.2], (0., 0.1, -0.1)
    table = cb.sweep(sigmas, biases=biases, keep_best=True, ax=False)
    assert isinstance(table, pd.DataFrame) and '<table' in table._repr_html_()
    assert list(table.columns) == ['sigma_rel', 'bias', 'valid_loss', 'mae', 'best'] and table['best'].dtype == bool
    assert len(table) == 9 and set(zip(table.sigma_rel, table.bias)) == {(s, b) for s in sigmas for b in biases}
    assert table['best'].sum() == 1
    best = table[table.best].iloc[0]
    assert best.valid_loss == table.valid_loss.min()
    assert table.valid_loss.nunique() > 3   # the grid's rows differ: the minimum above means something
    # each row is fastai's validation of that pair, the best one independently of fastai too
    row = table.iloc[4]
    assert list(row[['valid_loss', 'mae']]) == cb.validate_module(cb.synthesize(row.sigma_rel, bias=row.bias))
    m = cb.synthesize(**table.loc[table.best, ['sigma_rel', 'bias']].iloc[0])
    assert abs(valid_loss(m, learn.dls) - best.valid_loss) < 1e-5
    assert all(torch.equal(v, learn.model_ema.state_dict()[n]) for n, v in m.state_dict().items())   # keep_best
    # one bias, as before: a width per row, the bias column 0
    plain = cb.sweep(sigmas, ax=False)
    assert list(plain.sigma_rel) == sigmas and (plain.bias == 0).all()
    assert list(plain.valid_loss) == list(table.valid_loss[table.bias == 0])
    one = cb.sweep(0.1, biases=0.1, ax=False)   # single values, not grids
    assert len(one) == 1 and one.best.all() and one.valid_loss[0] == table.valid_loss[(table.sigma_rel == 0.1) & (table.bias == 0.1)].item()

def test_sweep_figure_keeps_its_labels_inside_when_saved(tmp_path):
    import matplotlib.pyplot as plt
    learn = tracked(tmp_path)
    cb = learn.post_hoc_ema
    table = cb.sweep([0.05, 0.1, 0.2], biases=(0., 0.2), ax=False)
    ax = cb._plot_sweep(table)
    fig = ax.figure
    try:
        assert len([l for l in ax.get_lines() if l.get_label().startswith('bias')]) == 2   # a line per bias
        fig.savefig(io.BytesIO(), format='png')   # as a script saves it: no bbox_inches='tight' to rescue it
        bb = fig.get_tightbbox(fig.canvas.get_renderer())   # everything drawn, in inches
        w, h = fig.get_size_inches()
        assert bb.x0 >= 0 and bb.y0 >= 0 and bb.x1 <= w and bb.y1 <= h, (bb, w, h)
    finally: plt.close(fig)

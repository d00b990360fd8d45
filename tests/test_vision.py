"""The vision path most fastai users take: `vision_learner` with a torchvision and a timm backbone, and `unet_learner`,
each with `EMASchedule` and with `PostHocEMA`, on small image folders this file draws (nothing is downloaded, no
pretrained weights).

Each test checks the EMA against a float64 EMA of the training weights kept by the test itself after every optimizer
step, then what a user sees: `learn.save`/`learn.load` into a fresh Learner gives the same EMA, `learn.model_ema(x)`
gives what the model with the EMA weights loaded gives, and `learn.export`/`load_learner` predicts.
"""
import math, warnings
import pandas as pd
import pytest
import torch
from fastai.vision.all import (Callback, ImageDataLoaders, SegmentationDataLoaders, Resize,
                               vision_learner, unet_learner, resnet18, load_learner, accuracy)
from fastai.callback.schedule import SchedCos
from PIL import Image, ImageDraw

from fastxtend_ema import EMASchedule, load_ema_weights
from fastxtend_ema.posthoc import PostHocEMA
from fastxtend_ema.test_utils import assert_ema_close, assert_same_state

pytestmark = pytest.mark.filterwarnings('ignore')   # fastai and torch warn about things these tests do not test

SIZE, N_PER_CLASS, BS = 32, 8, 4   # 16 images: 3 training batches of 4 and 1 validation batch an epoch
ARCHS = {'resnet18': resnet18, 'timm_resnet10t': 'resnet10t', 'unet_resnet18': resnet18}   # torchvision, timm, unet

# ----------------------------------------------------------------------------- the data, drawn here

def _draw(path, i, shape):
    "A `SIZE` px image of a disc or a square of a random colour on a random background; its mask (1 on the shape)"
    g = torch.Generator().manual_seed(i)
    c = lambda: tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
    x0, y0 = (int(v) for v in torch.randint(2, SIZE//2 - 2, (2,), generator=g))
    box = (x0, y0, x0 + SIZE//2, y0 + SIZE//2)
    img, mask = Image.new('RGB', (SIZE, SIZE), c()), Image.new('L', (SIZE, SIZE), 0)
    for im, fill in ((img, c()), (mask, 1)):
        (ImageDraw.Draw(im).ellipse if shape == 'disc' else ImageDraw.Draw(im).rectangle)(box, fill=fill)
    img.save(path/'images'/shape/f'{i:03d}.png')
    mask.save(path/'masks'/f'{i:03d}.png')

@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "images/{disc,square}/NNN.png and masks/NNN.png"
    path = tmp_path_factory.mktemp('shapes')
    for d in ('images/disc', 'images/square', 'masks'): (path/d).mkdir(parents=True)
    for i in range(2*N_PER_CLASS): _draw(path, i, ('disc', 'square')[i % 2])
    return path

def _dls(path, arch_name):
    if arch_name.startswith('unet'):
        files = sorted((path/'images').rglob('*.png'))
        return SegmentationDataLoaders.from_label_func(path, files, lambda f: path/'masks'/f.name, codes=['background', 'shape'],
                                                       valid_pct=0.25, seed=0, bs=BS, num_workers=0)
    return ImageDataLoaders.from_folder(path/'images', valid_pct=0.25, seed=0, bs=BS, num_workers=0, item_tfms=Resize(SIZE))

def _learner(folder, arch_name, path, cbs=None):
    "A fresh Learner of `arch_name` on the drawn data (random initial weights: `pretrained=False`), saving under `path`"
    torch.manual_seed(0)
    dls, arch = _dls(folder, arch_name), ARCHS[arch_name]
    if arch_name.startswith('unet'): return unet_learner(dls, arch, pretrained=False, cbs=cbs, path=path)
    return vision_learner(dls, arch, pretrained=False, metrics=accuracy, cbs=cbs, path=path)

# ----------------------------------------------------------------------------- the float64 reference

class Float64EMA(Callback):
    "Float64 EMAs of every floating tensor of the model, updated by this test after each optimizer step that happened"
    order = 100   # after the callbacks that may cancel a step
    def __init__(self, decays:dict):   # {name: f(pct_train at the batch's start, steps counted) -> decay}
        self.decays = decays
    def _weights(self): return {n: v.detach().double() for n, v in self.learn.model.state_dict().items() if v.is_floating_point()}
    def before_fit(self):   # each fit starts its EMAs from the weights it starts from (as both callbacks here do)
        self.emas, self.t = {k: {n: v.clone() for n, v in self._weights().items()} for k in self.decays}, 0
    def before_batch(self): self.pct, self.cancelled = self.learn.pct_train, False
    def after_cancel_step(self): self.cancelled = True
    def after_step(self):
        if self.cancelled: return
        self.t += 1
        w = self._weights()
        for k, f in self.decays.items():
            d = f(self.pct, self.t)
            for n, e in self.emas[k].items(): e.mul_(d).add_(w[n], alpha=1 - d)

def _assert_discriminates(ref, model):
    "The reference is far from the final training weights, so matching it says something"
    sd = model.state_dict()
    assert max((ref[n] - sd[n].double()).abs().max().item() for n in ref) > 1e-3

def _batch(learn):
    x, _ = learn.dls.valid.one_batch()
    return x

def _same_outputs(ema, model, x):
    "What a user sees: `learn.model_ema(x)` is the output of the model with the EMA weights loaded"
    ema.eval(); model.eval()
    with torch.no_grad(): torch.testing.assert_close(ema(x), model(x), atol=1e-5, rtol=1e-4,
                                                     msg=lambda m: f'model_ema(x) is not the model with the EMA weights: {m}')

# ----------------------------------------------------------------------------- the tests

START, FINAL, FINISH = 0.5, 0.9, 0.5   # the decay varies over the first half of each fit, so the schedule is checked

def _scheduled(pct, t):
    "EMASchedule's decay, written from its definition: fastai's cosine annealer from START to FINAL over [0, FINISH]"
    return SchedCos(START, FINAL)(min(pct/FINISH, 1.))

@pytest.mark.parametrize('arch_name', list(ARCHS))
def test_ema_schedule(folder, arch_name, tmp_path):
    "`fine_tune` with EMASchedule: the EMA of its last fit is the float64 one; save/load, `model_ema(x)`, export"
    ref = Float64EMA({'ema': _scheduled})
    learn = _learner(folder, arch_name, tmp_path, cbs=[EMASchedule(START, FINAL, finish=FINISH), ref])
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, freeze_epochs=1)
    assert learn.ema_schedule.updates == len(learn.dls.train)   # the unfrozen fit's steps; the frozen fit's EMA began anew
    _assert_discriminates(ref.emas['ema'], learn.model)
    assert_ema_close(learn.model_ema, ref.emas['ema'], eps=1e-5)

    learn.save('shapes')   # the fastai checkpoint and the EMA file beside it
    back = _learner(folder, arch_name, tmp_path, cbs=EMASchedule(START, FINAL, finish=FINISH))
    back.load('shapes')
    assert_same_state(back.model, learn.model)
    assert_same_state(back.model_ema, learn.model_ema)

    inference = _learner(folder, arch_name, tmp_path)   # no callback: the EMA weights loaded as the model
    load_ema_weights(inference, 'shapes')
    _same_outputs(learn.model_ema, inference.model, _batch(learn))

    learn.export('shapes.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); exported = load_learner(tmp_path/'shapes.pkl')
    assert_same_state(exported.model, learn.model)
    img = sorted((folder/'images').rglob('*.png'))[0]
    with exported.no_bar(): got = exported.predict(img)
    with learn.no_bar(): want = learn.predict(img)
    torch.testing.assert_close(got[2], want[2])   # the exported Learner predicts what the trained one does

@pytest.mark.parametrize('arch_name', list(ARCHS))
def test_posthoc_ema(folder, arch_name, tmp_path):
    "PostHocEMA: the tracked EMAs are the float64 power-function EMAs; a rebuilt width is `model_ema`; save/load"
    sigma_rels = (0.05, 0.10)
    cb = PostHocEMA(sigma_rels=sigma_rels, snapshot_every=2)
    learn = _learner(folder, arch_name, tmp_path, cbs=cb)
    # the power-function EMA of EDM2 (Karras et al. 2024), from its definition: beta_t = (1 - 1/t)**(gamma + 1)
    ref = Float64EMA({s: (lambda pct, t, g=g: (1 - 1/t)**(g + 1)) for s, g in zip(sigma_rels, cb.gammas)})
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=ref)
    assert cb.t == 2*len(learn.dls.train)
    for s, a in zip(sigma_rels, cb.emas):
        _assert_discriminates(ref.emas[s], learn.model)
        assert_ema_close(a.module, ref.emas[s], eps=1e-5)

    # at the last snapshot a tracked width is rebuilt as itself; keep_best makes the better one `learn.model_ema`
    rows = pd.DataFrame(cb.sweep(sigma_rels, keep_best=True, ax=False)).reset_index()   # a table or a list of rows
    best = float(rows['sigma_rel'].to_numpy()[rows['valid_loss'].to_numpy().argmin()])
    assert_ema_close(learn.model_ema, ref.emas[next(s for s in sigma_rels if math.isclose(s, best))], eps=1e-4)
    inference = _learner(folder, arch_name, tmp_path)
    inference.model.load_state_dict(learn.model_ema.state_dict())
    _same_outputs(learn.model_ema, inference.model, _batch(learn))

    learn.save('tracking')   # the tracked EMAs go beside the checkpoint; a fresh Learner continues from them
    back_cb = PostHocEMA(sigma_rels=sigma_rels, snapshot_every=2)
    back = _learner(folder, arch_name, tmp_path, cbs=back_cb)
    back.load('tracking')
    assert (back_cb.t, back_cb.snapshots) == (cb.t, cb.snapshots)
    for a, b in zip(cb.emas, back_cb.emas): assert_same_state(a.module, b.module)

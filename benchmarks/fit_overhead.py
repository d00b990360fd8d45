"""What an EMA callback adds to a whole fastai fit: extra time per batch against the one-pass bound of the model.

A 5M-parameter MLP on synthetic data (about 20 ms per batch on 2 CPU threads) is fitted with no EMA, with
fastxtend_ema's EMASchedule (update every step, and every 4th step) and with fastxtend 0.1.7's
EMACallback(foreach=True). Fits are interleaved round by round so drift on the machine hits all alike; the median
fit time of each is reported. Prints a markdown table, writes it (.md), JSON and a PNG; `benchmarks/results/` keeps
the runs the README quotes.

    python benchmarks/fit_overhead.py            # the measurement (a few minutes)
    python benchmarks/fit_overhead.py --quick    # smoke test: a small MLP, 1 round (CI runs this)
"""
import argparse, json, platform, statistics, sys, time, warnings
from pathlib import Path

import torch
from torch import nn
from fastai.basics import Learner, DataLoaders, DataLoader, MSELossFlat, SGD, Callback, defaults

OUT = Path(__file__).resolve().parent/'out'

def mlp(width):
    return nn.Sequential(nn.Linear(width, 2*width), nn.BatchNorm1d(2*width), nn.ReLU(),
                         nn.Linear(2*width, width), nn.ReLU(), nn.Linear(width, width//2), nn.ReLU(), nn.Linear(width//2, 1))

def dls(width, n_batches, bs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches*bs, width, generator=g); y = x[:, :1].clone()
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds, bs=bs, shuffle=False, drop_last=True), DataLoader(ds[:bs], bs=bs), device='cpu')

class BoundInLoop(Callback):
    "The one-pass bound inside training: one contiguous `lerp_` as large as the model, after every batch"
    def __init__(self, n): self.e,self.m = torch.zeros(n),torch.ones(n)
    def after_batch(self):
        if self.training: self.e.lerp_(self.m, 0.01)

def variants(n_params):
    from fastxtend_ema import EMASchedule
    v = {'no EMA': lambda: [],
         'one-pass bound, in the loop': lambda: [BoundInLoop(n_params)],
         'fastxtend_ema EMASchedule': lambda: [EMASchedule()],
         'fastxtend_ema EMASchedule(update_every=4)': lambda: [EMASchedule(update_every=4)]}
    try:
        import fastxtend.callback.ema as fx
        from fastxtend.callback.utils import LogDispatch
        if LogDispatch in defaults.callbacks: defaults.callbacks.remove(LogDispatch)  # undo its import-time side effect
        v['fastxtend 0.1.7 EMACallback(foreach=True)'] = lambda: [fx.EMACallback(foreach=True)]
    except ImportError as e: print(f'fastxtend not importable, left out: {e}', file=sys.stderr)
    return v

def fit_time(width, data, cbs):
    torch.manual_seed(0)
    learn = Learner(data, mlp(width), loss_func=MSELossFlat(), opt_func=SGD, lr=1e-3, cbs=cbs)
    with learn.no_bar(), learn.no_logging():
        t = time.perf_counter(); learn.fit(1); return time.perf_counter() - t, learn

def bound_us(n_params, reps=30):
    e, m = torch.zeros(n_params), torch.ones(n_params)
    for _ in range(3): e.lerp_(m, 0.01)
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); e.lerp_(m, 0.01); ts.append(time.perf_counter() - t)
    return statistics.median(ts)*1e6

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--width', type=int, default=1024, help='MLP width (1024: 4.7M parameters)')
    p.add_argument('--bs', type=int, default=128)
    p.add_argument('--batches', type=int, default=200, help='training batches per fit')
    p.add_argument('--rounds', type=int, default=9, help='fits of each variant (median reported)')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--quick', action='store_true', help='small MLP, 1 round: a smoke test, not a measurement')
    p.add_argument('--out', type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.quick: a.width, a.bs, a.batches, a.rounds = 128, 64, 10, 1
    if a.threads: torch.set_num_threads(a.threads)
    warnings.filterwarnings('ignore')
    n_params = sum(p.numel() for p in mlp(a.width).parameters())
    data, vs = dls(a.width, a.batches, a.bs), variants(n_params)
    fit_time(a.width, data, [])   # warm up
    times = {k: [] for k in vs}
    for _ in range(a.rounds):
        for k, make in vs.items(): times[k].append(fit_time(a.width, data, make())[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    b = bound_us(n_params)
    base = med['no EMA']
    machine = f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}'
    title = f'Whole-fit overhead, MLP {n_params/1e6:.1f}M params, bs {a.bs}, {a.batches} batches, {machine}'
    b_loop = (med['one-pass bound, in the loop'] - base)/a.batches*1e6
    lines = [title, '', f'one-pass bound for {n_params/1e6:.1f}M parameters: {b:,.0f} µs in a tight loop (cache-warm), '
             f'{b_loop:,.0f} µs inside training; batch without EMA: {base/a.batches*1e3:,.1f} ms', '',
             '| variant | fit (s) | fit / no EMA | extra per batch (µs) | extra / bound in the loop |', '|---|---:|---:|---:|---:|']
    rows = []
    for k, t in med.items():
        extra = (t - base)/a.batches*1e6
        rows.append(dict(variant=k, fit_s=t, ratio=t/base, extra_us=extra, extra_over_bound=extra/b_loop))
        lines.append(f'| {k} | {t:.3f} | {t/base:.3f} | {extra:,.0f} | {extra/b_loop:.2f} |')
    print('\n'.join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = 'fit_overhead' + ('_quick' if a.quick else '')
    (a.out/f'{stem}.json').write_text(json.dumps(dict(title=title, bound_us=b, bound_in_loop_us=b_loop, rows=rows, times=times), indent=1))
    (a.out/f'{stem}.md').write_text('\n'.join(lines) + f'\n\nCommand: `python benchmarks/fit_overhead.py {" ".join(argv or sys.argv[1:])}`\n')
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r['variant'] for r in rows], [r['ratio'] for r in rows])
    ax.axvline(1, color='k', lw=0.8); ax.set_xlabel('fit time / fit without EMA'); ax.set_title(title, fontsize=8)
    fig.tight_layout(); fig.savefig(a.out/f'{stem}.png', dpi=110); plt.close(fig)
    return rows

if __name__ == '__main__': main()

"""Every link of the README and the benchmarks page leads somewhere: a relative link to a file of the repository (and
to a heading of it, for a markdown page with an anchor), an external one only to the docs site or the repository named
in pyproject.toml. nbs/index.ipynb, the README's source and the docs site's front page, links inside nbs/ (Quarto turns
those into the site's pages) and to the repository's URL for the files outside it; tools/make_readme.py rewrites both
into paths from the repository's root."""
import json, re, sys, tomllib
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import make_readme

PAGES = ('README.md', 'benchmarks/README.md')
LINK = re.compile(r'\]\(([^)\s]+)\)')   # the target of a markdown link or image

def _urls():
    u = tomllib.loads((ROOT/'pyproject.toml').read_text(encoding='utf-8'))['project']['urls']
    return u['Repository'], u['Documentation']

def _slug(heading:str) -> str:
    "The anchor GitHub gives a markdown heading"
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')

def _anchors(md:str) -> set:
    return {_slug(m) for m in re.findall(r'^#{1,6} (.+)$', re.sub(r'```.*?```', '', md, flags=re.S), re.M)}

def problems(page:Path, text:str) -> list[str]:
    "What is wrong with the links of `text`, the markdown of `page`"
    repo, docs = _urls()
    bad = []
    for target in LINK.findall(text):
        if re.match(r'[A-Za-z][\w+.-]*:', target):
            if not target.startswith((repo, docs.rstrip('/'))): bad.append(f'{target}: not the docs site or the repository')
            continue
        path, _, anchor = target.partition('#')
        dest = (page.parent/path).resolve() if path else page
        if not dest.is_relative_to(ROOT) or not dest.exists(): bad.append(f'{target}: no such file in the repository')
        elif anchor and dest.suffix == '.md' and anchor not in _anchors(dest.read_text(encoding='utf-8')):
            bad.append(f'{target}: {dest.name} has no heading #{anchor}')
    return bad

@pytest.mark.parametrize('name', PAGES)
def test_links_resolve(name):
    page = ROOT/name
    text = page.read_text(encoding='utf-8')
    assert len(LINK.findall(text)) >= 5, 'the page links the notebooks and pages it names'
    assert not problems(page, text), problems(page, text)

def test_readme_links_every_notebook_and_page_it_names():
    text = (ROOT/'README.md').read_text(encoding='utf-8')
    targets = {t.partition('#')[0] for t in LINK.findall(text)}
    named = set(re.findall(r'`(\d\d_[a-z_]+|ema_tutorial|posthoc|migration)`', text))
    assert len(named) >= 10 and named <= {Path(t).stem for t in targets}, named - {Path(t).stem for t in targets}
    assert 'benchmarks/README.md' in targets   # the page the comparison and speed tables moved to

def test_index_links_are_what_the_docs_site_resolves():
    "In the notebook: paths inside nbs/ (Quarto makes them pages) or the repository's URL; never a path out of nbs/"
    repo, _ = _urls()
    cells = json.loads((ROOT/'nbs'/'index.ipynb').read_text(encoding='utf-8'))['cells']
    text = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    for target in LINK.findall(text):
        if target.startswith(f'{repo}/blob/main/'): assert (ROOT/target[len(f'{repo}/blob/main/'):].partition('#')[0]).exists(), target
        elif not re.match(r'[A-Za-z][\w+.-]*:|#', target):
            dest = (ROOT/'nbs'/target.partition('#')[0]).resolve()
            assert dest.is_relative_to(ROOT/'nbs') and dest.exists(), target

def test_rewrite_and_check_catch_bad_links(tmp_path):
    repo, docs = _urls()
    assert make_readme.readme_link('05_callback.ipynb', repo) == 'nbs/05_callback.ipynb'
    assert make_readme.readme_link('tutorials/posthoc.ipynb#sweep', repo) == 'nbs/tutorials/posthoc.ipynb#sweep'
    assert make_readme.readme_link(f'{repo}/blob/main/benchmarks/README.md#speed', repo) == 'benchmarks/README.md#speed'
    assert make_readme.readme_link(docs, repo) == docs
    page = ROOT/'README.md'
    assert problems(page, '[a](nbs/05_callback.ipynb) [b](benchmarks/README.md#speed)') == []
    assert len(problems(page, '[a](notebooks/05_callback.ipynb) [b](benchmarks/README.md#no-such-heading) '
                              '[c](https://example.com/x) [d](../outside.md)')) == 4

def _rows(md:str) -> list[str]:
    return [l for l in md.splitlines() if l.startswith('|')]

def test_benchmarks_page_quotes_the_kept_runs():
    "The speed tables are rows of the runs in benchmarks/results/, and the comparison's step rows their ResNet-50 column"
    page = (ROOT/'benchmarks'/'README.md').read_text(encoding='utf-8')
    compare, speed = page.split('\n## Speed\n')
    kept = {p.stem: p.read_text(encoding='utf-8') for p in (ROOT/'benchmarks'/'results').glob('*.md')}
    missing = [r for r in _rows(speed) if not any(r in _rows(t) for t in kept.values())]
    assert len(_rows(speed)) > 20 and not missing, missing
    for dtype in ('fp32', 'bf16'):
        row = next(r for r in _rows(compare) if r.startswith(f'| EMA step, {dtype} ResNet-50'))
        resnet = {c.split('|')[2].strip() for c in _rows(kept[f'ema_step_cpu_{dtype}'])}   # the ResNet-50 column
        quoted = re.findall(r'(\d+\.\d+)x', row)
        assert quoted and all(any(f'({q}x)' in c for c in resnet) for q in quoted), (row, resnet)

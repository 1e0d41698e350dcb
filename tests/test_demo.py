"""`dermkit demo` end to end on a small phantom set: every stage's report, one summary."""

import re

import pytest

from dermkit.demo import run_demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_links_reports(tmp_path):
    report = run_demo(tmp_path / "demo", n_lesions=60, seed=1)
    html = report.read_text()
    assert report == tmp_path / "demo" / "report.html"
    links = re.findall(r'href="([^"]+report\.html)"', html)
    assert len(links) == 2
    for link in links:
        assert (report.parent / link).exists(), link
    assert "baseline" in html and "fine-tune" in html
    assert "data:image/png;base64" in html  # the phantom grid is embedded
    assert (tmp_path / "demo" / "runs" / "finetune" / "model.safetensors").exists()

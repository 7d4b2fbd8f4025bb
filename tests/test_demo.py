"""The main job: `densiformer demo` runs infer over the Hipparcos test split and plots."""
import re

import numpy as np
import pyarrow.parquet as pq

from densiformer.cli import main
from densiformer.datasets import hipparcos


def test_demo_writes_posteriors_and_plots(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--num-samples", "16"]) == 0
    printed = capsys.readouterr().out
    for name in ("hipparcos_test.parquet", "posteriors.parquet", "hr_diagram.png", "red_star_posterior.png",
                 "calibration.png"):
        assert str(tmp_path / name) in printed
        assert (tmp_path / name).exists()
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    posteriors = pq.read_table(tmp_path / "posteriors.parquet").to_pandas()
    test = hipparcos("test")
    assert posteriors.hip.tolist() == test.hip.tolist()  # one row per star, in catalogue order
    # Without the parallax the posterior medians still follow the catalogue's M_Hp.
    known = test.abs_hpmag.notna().to_numpy()
    r = np.corrcoef(posteriors.abs_hpmag_median[known], test.abs_hpmag[known])[0, 1]
    assert r > 0.8, r
    # The red star it shows is a giant or a dwarf by its colours alone (bimodal), which
    # its magnitude and proper motion then decide.
    colours_only = float(re.search(r"P\(giant\) ([0-9.]+) given B-V, V-I;", printed).group(1))
    assert 0.2 < colours_only < 0.8, printed
    # Running it again starts afresh instead of refusing the existing output.
    assert main(["demo", "--out", str(tmp_path), "--num-samples", "4"]) == 0

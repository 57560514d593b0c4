"""Source headers and study results for the SR tests (imported by tests/test_sr_*.py)."""

from __future__ import annotations

import dataclasses

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_sr.model import (
    AlgorithmInfo,
    Classification,
    CodedLabel,
    ImageResult,
    QCCheck,
    QCOutcome,
    StudyResult,
)

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"

VIEW_ALGO = AlgorithmInfo(name="sononode-view", version="1.2.0", sha256="a" * 64)
FINDING_ALGO = AlgorithmInfo(name="sononode-finding", version="0.9.1", sha256="b" * 64)
SIM_ALGO = AlgorithmInfo(
    name="sononode-sim", version="0.1.0", sha256="c" * 64, simulated_training_data=True
)

FOUR_CHAMBER = CodedLabel("4CH", "99SONONODE", "Four chamber view")
ABDOMEN = CodedLabel("ABD", "99SONONODE", "Transverse abdominal view")
NORMAL = CodedLabel("17621005", "SCT", "Normal")
ABNORMAL = CodedLabel("263654008", "SCT", "Abnormal")


def make_source(
    study_uid: str,
    series_uid: str,
    *,
    number: int,
    frames: int = 1,
    patient_id: str = "PAT-001",
) -> Dataset:
    """An Ultrasound (Multi-frame) Image header with patient, study and series modules."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = US_MULTIFRAME if frames > 1 else US_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19850101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240501"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.Modality = "US"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Manufacturer = "Acme Ultrasound"
    ds.Rows = 480
    ds.Columns = 640
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
    return ds


def make_sources(n_single: int = 2, loop_frames: int = 40) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    sources = [make_source(study, series, number=i + 1) for i in range(n_single)]
    if loop_frames:
        sources.append(make_source(study, series, number=n_single + 1, frames=loop_frames))
    return sources


def view(code: CodedLabel = FOUR_CHAMBER, p: float = 0.93, **kw: object) -> Classification:
    return Classification(task="view", label=code.value, code=code, probability=p,
                          algorithm=VIEW_ALGO, threshold=0.6, **kw)  # type: ignore[arg-type]


def finding(code: CodedLabel = NORMAL, p: float = 0.87, **kw: object) -> Classification:
    return Classification(task="finding", label=code.value, code=code, probability=p,
                          algorithm=FINDING_ALGO, threshold=0.7, **kw)  # type: ignore[arg-type]


def image_result(source: Dataset, **kw: object) -> ImageResult:
    frames = int(source.get("NumberOfFrames", 1))
    defaults: dict[str, object] = dict(
        sop_instance_uid=source.SOPInstanceUID,
        sop_class_uid=source.SOPClassUID,
        qc_outcome=QCOutcome.PASS,
        frames_total=frames,
        frames_used=frames,
        view=view(),
        finding=finding(),
        quality_score=0.91,
    )
    defaults.update(kw)
    return ImageResult(**defaults)  # type: ignore[arg-type]


def normal_result(sources: list[Dataset]) -> StudyResult:
    images = [image_result(s) for s in sources]
    images[0] = dataclasses.replace(images[0], region=(40, 30, 600, 450), ood_score=0.12)
    images[-1] = dataclasses.replace(images[-1], frames_used=32, view=view(ABDOMEN, 0.81))
    return StudyResult(
        study_instance_uid=sources[0].StudyInstanceUID,
        images=tuple(images),
        algorithms=(VIEW_ALGO, FINDING_ALGO),
        conclusion=dataclasses.replace(finding(NORMAL, 0.9), task="conclusion"),
    )


def review_result(sources: list[Dataset]) -> StudyResult:
    reason = "low confidence: 0.41 below threshold 0.70"
    images = [image_result(s) for s in sources]
    images[1] = dataclasses.replace(
        images[1],
        finding=finding(ABNORMAL, 0.41, abstained=True, reason=reason),
        needs_review=True,
        review_reasons=(reason,),
    )
    ood = "out of distribution: score 0.97 above 0.80"
    images[2] = dataclasses.replace(
        images[2],
        view=view(ABDOMEN, 0.55, abstained=True, reason=ood),
        out_of_distribution=True,
        ood_score=0.97,
        needs_review=True,
        review_reasons=(ood,),
    )
    return StudyResult(
        study_instance_uid=sources[0].StudyInstanceUID,
        images=tuple(images),
        algorithms=(VIEW_ALGO, FINDING_ALGO),
        conclusion=dataclasses.replace(
            finding(ABNORMAL, 0.41, abstained=True, reason=reason), task="conclusion"
        ),
        needs_review=True,
        review_reasons=(f"image 2: {reason}",),
    )


def qc_failed_result(sources: list[Dataset]) -> StudyResult:
    images = [image_result(s) for s in sources]
    images[0] = dataclasses.replace(
        images[0],
        qc_outcome=QCOutcome.FAIL,
        qc_checks=(
            QCCheck("saturated", QCOutcome.FAIL, "62% of pixels saturated", 0.62, 0.2),
            QCCheck("low_contrast", QCOutcome.WARN, "contrast below 0.1", 0.08, 0.1),
            QCCheck("not_blank", QCOutcome.PASS, "image is not blank"),
        ),
        frames_used=0,
        view=None,
        finding=None,
        quality_score=0.05,
    )
    return StudyResult(
        study_instance_uid=sources[0].StudyInstanceUID,
        images=tuple(images),
        algorithms=(VIEW_ALGO, FINDING_ALGO),
        conclusion=dataclasses.replace(finding(NORMAL, 0.88), task="conclusion"),
    )


def not_assessable_result(sources: list[Dataset]) -> StudyResult:
    blank = QCCheck("blank", QCOutcome.FAIL, "all frames are blank", 0.0, 2.0)
    images = tuple(
        image_result(s, qc_outcome=QCOutcome.FAIL, qc_checks=(blank,), frames_used=0,
                     view=None, finding=None, quality_score=0.0)
        for s in sources
    )
    return StudyResult(
        study_instance_uid=sources[0].StudyInstanceUID,
        images=images,
        algorithms=(VIEW_ALGO, FINDING_ALGO),
        conclusion=None,
        assessable=False,
        needs_review=True,
        review_reasons=("no usable image: all frames are blank",),
    )


def simulated_result(sources: list[Dataset]) -> StudyResult:
    sim_view = dataclasses.replace(view(), algorithm=SIM_ALGO)
    images = tuple(image_result(s, view=sim_view, finding=None) for s in sources)
    return StudyResult(
        study_instance_uid=sources[0].StudyInstanceUID,
        images=images,
        algorithms=(SIM_ALGO,),
    )

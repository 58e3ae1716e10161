"""Facts that several layers share, in one place that imports nothing heavy (no numpy, no
torch): the densitometry definitions (:mod:`medseg.quantify` computes them,
:mod:`medseg.io.dicom_sr` names them in its codes), the suffixes of volume files, the names
of a study's output files and the segmentation methods. The modules that own each fact
re-export it; importing it from here keeps the IO layer below the others and lets argument
parsing stay light."""

from __future__ import annotations

from enum import Enum

__all__ = ["LAA_THRESHOLD_HU", "LABEL_SUFFIXES", "MASK_NAME", "METHODS", "OUTPUT_NAMES",
           "PD_PERCENTILE", "REPORT_FILENAMES", "SEG_FILENAME", "SR_FILENAME",
           "SUMMARY_FILENAME", "VOLUME_SUFFIXES", "Method"]

#: Emphysema threshold (Gevenois 1996): voxels below it are "low-attenuation" (LAA-950).
LAA_THRESHOLD_HU = -950.0
#: Percentile of the lung's HU distribution reported as PD15.
PD_PERCENTILE = 15.0

# -- files -------------------------------------------------------------------------------
#: Suffixes of single-file volumes medseg reads (lower case; ``.nii.gz`` matched whole).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Suffixes of label files matched by name (references, predictions in a cohort folder).
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

#: What ``medseg segment`` writes in a study folder: the mask, the record of the run, the
#: report, and for DICOM input the SEG and the SR.
MASK_NAME = "lungs.nii.gz"
SUMMARY_FILENAME = "segment.json"
REPORT_FILENAMES = ("report.json", "report.html", "report.csv")
SEG_FILENAME = "lungs.seg.dcm"
SR_FILENAME = "lungs.sr.dcm"
#: Every file a study's outputs may hold: one unit (``medseg.io.atomic.output_unit``).
OUTPUT_NAMES = (MASK_NAME, SUMMARY_FILENAME, *REPORT_FILENAMES, SEG_FILENAME, SR_FILENAME)


# -- segmentation ----------------------------------------------------------------------------
class Method(str, Enum):
    """How ``segment`` finds the lungs."""

    UNET = "unet"
    THRESHOLD = "threshold"


#: The method names, for argument parsers and configs.
METHODS = tuple(m.value for m in Method)

"""Exports of a finished run for other tools: `dicom_maps` (saliency maps as DICOM Parametric
Maps referencing their source images, for a radiologist's viewer)."""

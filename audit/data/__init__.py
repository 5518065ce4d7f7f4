"""Ingest: PNG and DICOM readers, NIH CSV parsing, manifests, preprocessing.

Submodules (imported on demand so that reader worker processes stay light):

- `audit.data.readers`: ``read_image(path) -> DecodedImage``, ``RejectedInput``
- `audit.data.png`, `audit.data.dicom`: the two decoders behind ``read_image``
- `audit.data.nih`: ``read_bbox_csv``, ``read_labels_csv``, ``default_bbox_csv``,
  ``to_model_finding``
- `audit.data.manifest`: ``ingest(...) -> IngestResult``, ``read_manifest``
- `audit.data.preprocess`: ``preprocess(pixels, size) -> PreprocessedImage``, ``scale_boxes``,
  ``unscale_boxes``, ``draw_box``
"""

from audit.data.readers import DecodedImage, RejectedInput, read_image

__all__ = ["DecodedImage", "RejectedInput", "read_image"]

"""Dense prediction on a BEiT-3 vision encoder: the feature-pyramid backbone (:mod:`.backbone`), the data of
detection and segmentation tasks and their metrics."""

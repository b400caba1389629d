"""Checking served detections: order-free matching, COCO mAP, and the eager reference a version was built from,
and ``detserve eval`` (evalrun: served vs eager COCO mAP)."""

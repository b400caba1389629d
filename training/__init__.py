"""The demo detector's data and training: a generated, seeded detection dataset (COCO format) and the
script that trains SSDlite320 on it on a CPU."""

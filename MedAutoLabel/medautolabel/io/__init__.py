"""Reading and writing files: images and DICOM series, .seg.nrrd, result files, atomic writes, the PNG overview."""

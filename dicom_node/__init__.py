"""Everything that speaks DICOM: the SCP that receives studies, the SCU that sends results,
pixel decoding and Structured Report building. Never imports :mod:`worker`."""

"""Pure transforms: ECG conditioning, video crop/resize/resample, clip segmentation."""

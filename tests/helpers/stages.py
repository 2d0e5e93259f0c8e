"""Stage calls with the settings given as keywords: tests vary one setting at a time."""
from eigen_export.settings import BuildSettings, CalibrationSettings, ExportSettings, FoldSettings
from eigen_export.stages.build import run_build
from eigen_export.stages.calibrate import run_calibrate
from eigen_export.stages.export import run_export
from eigen_export.stages.fold import run_fold


def export(model_dir, out=None, force=False, replace_stale=False, **settings):
    return run_export(model_dir, ExportSettings(**settings), out, force=force, replace_stale=replace_stale)


def build(onnx_dir, out=None, force=False, replace_stale=False, **settings):
    return run_build(onnx_dir, BuildSettings(**settings), out, force=force, replace_stale=replace_stale)


def calibrate(source, out, device="cpu", force=False, **settings):
    return run_calibrate(str(source), out, CalibrationSettings(**settings), device=device, force=force, progress=False)


def fold(source, calib_dir, out, force=False, **settings):
    return run_fold(str(source), calib_dir, out, FoldSettings.target(**settings), force=force)

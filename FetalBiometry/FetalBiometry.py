"""FetalBiometry: fetal head circumference, BPD and OFD from a 2D ultrasound image, in 3D Slicer.

Thin glue over `FetalBiometryLib` (the work) and `deepnav.mrml` (nodes <-> arrays). A measurement
takes ~0.2 s on a CPU, so it runs on the GUI thread behind a wait cursor; a batch shows a
cancellable progress dialog.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from deepnav import slicer_dependencies

COLUMNS = ["file", "hc_mm", "bpd_mm", "ofd_mm", "contour_length_mm", "pixel_count_hc_mm", "pixel_mm", "flags", "reason"]


class FetalBiometry(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Fetal Biometry")
        self.parent.categories = ["DeepNav"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepNav developers"]
        self.parent.helpText = _(
            "Head circumference (ellipse perimeter, as HC18 and sonographers' ellipse tools report it), "
            "BPD and OFD from a 2D transthalamic-plane ultrasound image, with a head segmentation network "
            "run on four corner crops. The ellipse is shown as a closed curve, BPD and OFD as lines.")
        self.parent.acknowledgementText = _(
            "The shipped model was trained on the HC18 Grand Challenge data (van den Heuvel et al., PLoS ONE "
            "13(8): e0200412, 2018; CC BY 4.0).")


@parameterNodeWrapper
class FetalBiometryParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    pixelSizeMm: Annotated[float, WithinRange(0.0, 2.0)] = 0.0  # 0: not known yet (the .ui's range)
    modelPath: Path  # ctkPathLineEdit holds a Path; empty (Path()): the shipped model


def ensure_dependencies() -> None:
    """torch (PyTorch extension) and scikit-image: installed on first use, after asking, before any
    FetalBiometryLib import (Testing/test_slicer_dependencies.py holds the module to this)."""
    slicer_dependencies.ensure_dependencies("FetalBiometry", "Fetal Biometry")


class FetalBiometryWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FetalBiometry.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FetalBiometryLogic()
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.batchButton.connect("clicked(bool)", self.onBatch)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._parameterNode.pixelSizeMm > 0)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Measure the head") if ready else _("Select an image and give its pixel size")

    def onInputChanged(self, node) -> None:
        """A DICOM image brings its pixel size; a PNG loads with 1 mm, which is not one (nor is
        anything outside the spin box's 0-2 mm, which the parameter's WithinRange would refuse)."""
        if node is not None and self._parameterNode is not None:
            spacing = node.GetSpacing()[0]
            self._parameterNode.pixelSizeMm = spacing if abs(spacing - 1.0) > 1e-9 and 0.0 < spacing <= 2.0 else 0.0

    def onApply(self) -> None:
        from deepnav.mrml import chosen_path

        with slicer.util.tryWithErrorDisplay(_("Measurement failed."), waitCursor=True):
            row = self.logic.measureNode(self._parameterNode.inputVolume, self._parameterNode.pixelSizeMm,
                                         chosen_path(self._parameterNode.modelPath))
            self._show([row])

    def onBatch(self) -> None:
        from deepnav.mrml import chosen_path

        folder, csv_path = self.ui.batchFolderLineEdit.currentPath, self.ui.pixelSizeCsvLineEdit.currentPath
        with slicer.util.tryWithErrorDisplay(_("Batch measurement failed."), waitCursor=True):
            progress = slicer.util.createProgressDialog(labelText=_("Measuring..."), maximum=100)

            def report(fraction: float, text: str) -> bool:
                progress.value, progress.labelText = int(100 * fraction), text
                slicer.app.processEvents()
                return progress.wasCanceled  # True stops the batch

            try:
                rows = self.logic.measureFolder(folder, csv_path or None, chosen_path(self._parameterNode.modelPath),
                                                progress=report)
            finally:
                progress.close()
            self._show(rows)

    def onExport(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, _("Export measurements"), "measurements.csv", "CSV (*.csv)")
        if path:
            self.logic.exportCsv(path)

    def _show(self, rows: list[dict]) -> None:
        self.ui.tableView.setMRMLTableNode(self.logic.tableNode())
        done = [r for r in rows if r.get("hc_mm") is not None]
        if len(rows) == 1 and done:
            r = done[0]
            text = _("HC {hc:.1f} mm, BPD {bpd:.1f} mm, OFD {ofd:.1f} mm").format(hc=r["hc_mm"], bpd=r["bpd_mm"],
                                                                                 ofd=r["ofd_mm"])
            self.ui.resultLabel.text = text + (f"  ({'; '.join(r['flags'])})" if r.get("flags") else "")
        elif len(rows) == 1:
            self.ui.resultLabel.text = _("Not measurable: {reason}").format(reason=rows[0].get("reason"))
        else:
            self.ui.resultLabel.text = _("{n} of {total} images measured").format(n=len(done), total=len(rows))


class FetalBiometryLogic(ScriptedLoadableModuleLogic):
    TABLE = "FetalBiometry measurements"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenter = None
        self._segmenterPath = None
        self.rows: list[dict] = []

    def getParameterNode(self):
        return FetalBiometryParameterNode(super().getParameterNode())

    def segmenter(self, modelPath=None):
        if self._segmenter is None or self._segmenterPath != modelPath:
            ensure_dependencies()
            from FetalBiometryLib.segment import HeadSegmenter

            self._segmenter, self._segmenterPath = HeadSegmenter.load(modelPath), modelPath
        return self._segmenter

    def measureNode(self, volumeNode, pixelMm: float, modelPath=None) -> dict:
        """Measure the head in a single-slice volume node; show the ellipse (closed curve), BPD and
        OFD (lines) and the head label map over it; add a row to the measurements table."""
        ensure_dependencies()
        from FetalBiometryLib.image_io import check_pixel_size
        from FetalBiometryLib.pipeline import measure_image, measurement_row

        from deepnav import mrml

        pixels, _nodeSpacing, matrix = mrml.image2d_from_node(volumeNode)
        pixelMm = check_pixel_size(pixelMm, volumeNode.GetName())
        result = measure_image(self.segmenter(modelPath), pixels, pixelMm)
        row = measurement_row(volumeNode.GetName(), pixelMm, result.measurement)
        m = result.measurement
        if m.ellipse_px is not None:
            scene = slicer.mrmlScene
            mrml.closed_curve(scene, "HC ellipse", mrml.pixels_to_ras(m.ellipse_px.outline(64), matrix))
            ofd, bpd = m.ellipse_px.axes()
            mrml.line(scene, "OFD", *mrml.pixels_to_ras(ofd, matrix))
            mrml.line(scene, "BPD", *mrml.pixels_to_ras(bpd, matrix))
            label = mrml.labelmap(scene, "Fetal head", m.mask, matrix)
            slicer.util.setSliceViewerLayers(background=volumeNode, label=label, labelOpacity=0.3)
        self.rows.append(row)
        self.tableNode()
        return row

    def measureFolder(self, folder: str, csvPath=None, modelPath=None, progress=None) -> list[dict]:
        """Measure every image in a folder (pixel sizes from an HC18-style CSV, or DICOM)."""
        ensure_dependencies()
        from FetalBiometryLib.hc18 import csv_pixel_size, read_pixel_sizes
        from FetalBiometryLib.pipeline import measure_file

        table = read_pixel_sizes(csvPath) if csvPath else {}
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg", ".dcm", ".bmp"))
                       and "_annotation" not in n.lower())
        rows = []
        for k, name in enumerate(names):
            if progress and progress(k / max(len(names), 1), name):
                break
            given, whyNone = csv_pixel_size(table, csvPath, Path(folder) / name) if csvPath else (None, None)
            row, _result = measure_file(self.segmenter(modelPath), Path(folder) / name, given, whyNone)
            rows.append(row)
        self.rows.extend(rows)
        self.tableNode()
        return rows

    def tableNode(self):
        """The measurements table, brought up to date with `rows`."""
        from deepnav import mrml

        return mrml.table(slicer.mrmlScene, self.TABLE, self.rows, COLUMNS)

    def exportCsv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: "; ".join(v) if isinstance(v, list) else v for k, v in r.items()} for r in self.rows)


class FetalBiometryTest(ScriptedLoadableModuleTest):
    """On the three bundled HC18 images (fetuses held out from training): HC within 3% of the
    sonographer's ellipse, and the markups where the measurement says."""

    def setUp(self):
        ensure_dependencies()
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bundled_samples()

    def test_bundled_samples(self):
        from FetalBiometryLib.hc18 import read_pixel_sizes

        samples = os.path.join(os.path.dirname(__file__), "Resources", "Samples")
        reference = read_pixel_sizes(os.path.join(samples, "samples_pixel_size_and_HC.csv"))
        logic = FetalBiometryLogic()
        for name, (pixelMm, hcMm) in sorted(reference.items()):
            node = slicer.util.loadVolume(os.path.join(samples, name), {"singleFile": True})
            row = logic.measureNode(node, pixelMm)
            self.delayDisplay(f"{name}: HC {row['hc_mm']:.1f} mm (reference {hcMm:.1f} mm)")
            self.assertAlmostEqual(row["hc_mm"], hcMm, delta=0.03 * hcMm)
            curve = slicer.util.getNode("HC ellipse")
            self.assertEqual(curve.GetNumberOfControlPoints(), 64)
        self.assertEqual(logic.tableNode().GetTable().GetNumberOfRows(), len(reference))
        logging.info("FetalBiometryTest passed")

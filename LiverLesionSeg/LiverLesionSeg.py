"""LiverLesionSeg: liver lesions from a multi-phase contrast CT, in 3D Slicer.

Thin glue over `LiverLesionSegLib.pipeline.segment_study` (registration of the phases, the
network, lesion statistics) and `deepnav.mrml`. The volumes are copied out of their nodes on the
GUI thread; the work runs as `deepnav liver segment` in its own process (deepnav.child_process),
with a progress bar and Cancel, and a crash of it leaves Slicer running; the result
becomes a segmentation (one segment per lesion, standard terminology: liver; mass, and the
liver), a statistics table and the lesion centres as points. A result that fails the Lib's
plausibility checks is shown too, with a warning that says why it is not reliable.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from deepnav import slicer_dependencies

PHASES = ("plain", "arterial", "venous", "delayed")
SEGMENTATION = "Liver lesions"
TABLE = "Liver lesion statistics"
CENTRES = "Lesion centres"
# Slicer terminology entries (SNOMED CT codes): a mass in the liver, and the liver
MASS = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered "
        "Structure~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^")
LIVER = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
         "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")


class LiverLesionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Liver Lesion Segmentation")
        self.parent.categories = ["DeepNav"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepNav developers"]
        self.parent.helpText = _(
            "Segments liver lesions in a contrast CT from one to four phases (plain, arterial, portal venous, "
            "delayed; two or more are more accurate): the phases are registered to the reference phase, fused in "
            "a 3D U-Net, and each lesion is measured (volume, longest axial diameter, mean HU per phase). A result "
            "whose liver or lesions are anatomically implausible is shown with a warning saying why.")
        self.parent.acknowledgementText = _(
            "The shipped model was trained on simulated lesions inserted into a public abdominal CT; see its model card.")


def ensure_dependencies() -> None:
    """torch (PyTorch extension) and MONAI: installed on first use, after asking, before any
    LiverLesionSegLib import (Testing/test_slicer_dependencies.py holds the module to this)."""
    slicer_dependencies.ensure_dependencies("LiverLesionSeg", "Liver Lesion Segmentation")


@parameterNodeWrapper
class LiverLesionSegParameterNode:
    plainVolume: slicer.vtkMRMLScalarVolumeNode
    arterialVolume: slicer.vtkMRMLScalarVolumeNode
    venousVolume: slicer.vtkMRMLScalarVolumeNode
    delayedVolume: slicer.vtkMRMLScalarVolumeNode
    reference: Annotated[str, Choice(["auto", *PHASES])] = "auto"
    liverSegmentation: slicer.vtkMRMLSegmentationNode
    registration: Annotated[str, Choice(["pso-powell", "sitk"])] = "pso-powell"
    modelPath: Path  # ctkPathLineEdit holds a Path; empty (Path()): the shipped model
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"

    def phaseNodes(self) -> dict:
        nodes = {p: getattr(self, f"{p}Volume") for p in PHASES}
        return {p: n for p, n in nodes.items() if n is not None}


class LiverLesionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = qt.QTimer()
        self._timer.setInterval(250)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverLesionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverLesionSegLogic()
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", lambda: self.logic.task and self.logic.task.cancel())
        self._timer.connect("timeout()", self._poll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._timer.stop()

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
        running = self.logic.task is not None and not self.logic.task.done
        ready = bool(self._parameterNode and self._parameterNode.phaseNodes())
        self.ui.applyButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running

    def onApply(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            self.logic.start(self._parameterNode)
            self.ui.resultLabel.text = ""
            self._timer.start()
            self._updateButtons()

    def _poll(self) -> None:
        task = self.logic.task
        self.ui.progressBar.value = int(100 * task.fraction)
        self.ui.progressBar.format = f"{task.message} (%p%)"
        if not task.done:
            return
        self._timer.stop()
        self._updateButtons()
        with slicer.util.tryWithErrorDisplay(_("Segmentation stopped.")):
            try:
                result = self.logic.finish()
            except Exception as exc:  # cancelled, bad input, or the worker process crashed / was killed
                self.ui.resultLabel.text = _("Segmentation stopped: {error}").format(error=exc)
                raise
            self.ui.tableView.setMRMLTableNode(slicer.mrmlScene.GetFirstNodeByName(TABLE))
            reasons = result.plausibility.reasons
            self.ui.resultLabel.text = "\n".join([result.message(), *reasons, *result.warnings])
            if reasons:  # the result is in the scene, but must not pass for a good one
                slicer.util.warningDisplay(
                    _("This result is not reliable:\n{reasons}\n\nCheck the liver and the lesions before using "
                      "any figure.").format(reasons="\n".join(f"- {r}" for r in reasons)),
                    windowTitle=_("Liver Lesion Segmentation"))


class LiverLesionSegLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._model = None
        self._modelKey = None
        self.task = None  # deepnav.child_process.ChildTask
        self._workDir = None  # the running child's input and output files
        self._referenceNode = None

    def getParameterNode(self):
        return LiverLesionSegParameterNode(super().getParameterNode())

    def loadModel(self, modelPath, device: str):
        """The model (the shipped one for an empty path), loaded once per path and device."""
        from deepnav.mrml import chosen_path

        key = (chosen_path(modelPath), device)
        if self._model is None or self._modelKey != key:
            ensure_dependencies()
            from LiverLesionSegLib.model_io import load_model

            self._model, self._modelKey = load_model(key[0], device), key
        return self._model

    def _inputs(self, parameters):
        """Phases, reference and liver mask copied out of their nodes (GUI thread)."""
        ensure_dependencies()
        from LiverLesionSegLib.preprocess import reference_phase

        from deepnav import mrml
        from deepnav.errors import InputError

        nodes = parameters.phaseNodes()
        if not nodes:
            raise InputError("select at least one phase")
        phases = {p: mrml.volume_from_node(n) for p, n in nodes.items()}
        phases = {p: v.with_array(v.array.astype("float32")) for p, v in phases.items()}
        reference = reference_phase(phases) if parameters.reference == "auto" else parameters.reference
        if reference not in phases:
            raise InputError(f"the reference phase ({reference}) has no volume selected")
        liver = None
        if parameters.liverSegmentation is not None:
            liver = mrml.labelmap_from_segmentation(parameters.liverSegmentation, nodes[reference])
        self._referenceNode = nodes[reference]
        return phases, reference, liver

    def segment(self, parameters, progress=None, cancel=None):
        """Synchronously (tests, scripts): the study's StudyResult, shown in the scene."""
        ensure_dependencies()
        from LiverLesionSegLib.pipeline import segment_study

        phases, reference, liver = self._inputs(parameters)
        model = self.loadModel(parameters.modelPath, parameters.device)
        result = segment_study(model, phases, reference=reference, registration=parameters.registration, liver=liver,
                               **({"progress": progress} if progress else {}), cancel=cancel)
        self.show(result)
        return result

    def start(self, parameters) -> None:
        """`deepnav liver segment` in its own process (Slicer's Python): the phases and liver mask
        go to it as files, its progress lines drive `task`, Cancel ends it, and a crash or kill
        comes back as an error from `finish` while Slicer goes on."""
        ensure_dependencies()  # the child process uses the same Python packages
        import tempfile

        from deepnav.child_process import ChildTask, child_environment, deepnav_command
        from deepnav.imaging import write_volume
        from deepnav.mrml import chosen_path

        if self.task is not None and not self.task.done:
            raise RuntimeError("a segmentation is already running")
        phases, reference, liver = self._inputs(parameters)
        self._workDir = Path(tempfile.mkdtemp(prefix="deepnav-liver-"))
        args = ["liver", "segment", "--reference", reference, "--registration", parameters.registration,
                "--device", parameters.device, "--out", str(self._workDir / "out")]
        for name, volume in phases.items():
            args += ["--phase", f"{name}={write_volume(volume, self._workDir / f'{name}.nrrd')}"]
        if liver is not None:
            args += ["--liver", str(write_volume(liver, self._workDir / "liver.nrrd"))]
        if chosen_path(parameters.modelPath) is not None:
            args += ["--model", str(chosen_path(parameters.modelPath))]
        self.task = ChildTask(deepnav_command(*args), env=child_environment("LiverLesionSegLib"))

    def finish(self):
        """The finished child's result, shown in the scene (raises what went wrong instead)."""
        ensure_dependencies()
        import shutil

        from LiverLesionSegLib.pipeline import StudyResult
        from LiverLesionSegLib.plausibility import EXIT_UNRELIABLE

        try:
            self.task.result(accept=(0, EXIT_UNRELIABLE))  # an implausible result is written, and shown as such
            result = StudyResult.read(self._workDir / "out")
        finally:
            shutil.rmtree(self._workDir, ignore_errors=True)
        self.show(result)
        return result

    def show(self, result) -> None:
        """Segmentation (one segment per lesion + the liver), statistics table, lesion centres."""
        import numpy as np
        from LiverLesionSegLib.statistics import table_rows

        from deepnav import mrml

        scene = slicer.mrmlScene
        lesions = result.lesions.array.astype(np.uint16)
        liver_value = int(lesions.max()) + 1
        labels = np.where(lesions > 0, lesions, np.where(result.liver.array > 0, liver_value, 0)).astype(np.uint16)
        segments = {n: (f"Lesion {n}", MASS) for n in range(1, liver_value)}
        segments[liver_value] = ("Liver", LIVER)
        segmentation = mrml.segmentation_from_labels(scene, SEGMENTATION, result.lesions.with_array(labels), segments)
        if self._referenceNode is not None:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(self._referenceNode)
        segmentation.CreateDefaultDisplayNodes()
        columns, rows = table_rows(result.statistics)
        mrml.table(scene, TABLE, rows, columns)
        centres = np.array([r["centre_ras_mm"] for r in result.statistics], dtype=np.float64).reshape(-1, 3)
        mrml.fiducials(scene, CENTRES, centres, [f"Lesion {r['lesion']}" for r in result.statistics])


class LiverLesionSegTest(ScriptedLoadableModuleTest):
    """A simulated two-phase study (synthetic abdomen, never used in training): lesion Dice with the
    shipped model, and the outputs in the scene."""

    def setUp(self):
        ensure_dependencies()
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_simulated_study()

    def test_simulated_study(self):
        import numpy as np
        from LiverLesionSegLib.abdomen import synthetic_abdomen
        from LiverLesionSegLib.evaluation import EVALUATION_SEED_BASE, dice
        from LiverLesionSegLib.simulator import simulate_case

        from deepnav import mrml

        self.delayDisplay("Simulating a two-phase study")
        seed = EVALUATION_SEED_BASE + 999_000
        case = simulate_case(synthetic_abdomen(seed), seed, phases=("arterial", "venous"), lesions=(2, 2),
                             field="ct")  # the whole synthetic CT: false positives anywhere count
        logic = LiverLesionSegLogic()
        parameters = logic.getParameterNode()
        parameters.arterialVolume = mrml.volume_node(slicer.mrmlScene, "arterial", case.phases["arterial"])
        parameters.venousVolume = mrml.volume_node(slicer.mrmlScene, "venous", case.phases["venous"])
        parameters.device = "cpu"
        t0 = time.perf_counter()
        result = logic.segment(parameters)
        score = dice(case.lesions.array > 0, result.lesions.array > 0)
        self.delayDisplay(f"Lesion Dice {score:.3f}, {len(result.statistics)} lesion(s), {time.perf_counter() - t0:.0f} s")
        self.assertGreater(score, 0.8)
        self.assertTrue(result.plausibility.reliable, result.plausibility.reasons)
        segmentation = slicer.mrmlScene.GetFirstNodeByName(SEGMENTATION).GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(result.statistics) + 1)
        self.assertEqual(slicer.mrmlScene.GetFirstNodeByName(TABLE).GetTable().GetNumberOfRows(), len(result.statistics))
        self.assertEqual(slicer.mrmlScene.GetFirstNodeByName(CENTRES).GetNumberOfControlPoints(), len(result.statistics))
        self.assertTrue(np.all(result.liver.array[result.lesions.array > 0] == 1))
        logging.info("LiverLesionSegTest passed")

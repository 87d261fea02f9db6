"""MRUSFusion: live MR / 3D ultrasound fusion in 3D Slicer.

Thin glue over `MRUSFusionLib` (registration, live back ends, fiducial alignment, training) and
`deepnav.mrml` (nodes <-> arrays). The GUI thread only copies each new US frame out of its node
and hands it over to `deepnav fusion serve`: a child process started on a free loopback port
with Slicer's own Python (MRUSFusionLib.service_process), or a service elsewhere (service mode,
e.g. on a GPU machine), through the same client; torch never runs inside Slicer for live fusion.
A 50 ms timer puts the newest result into nodes, so the GUI never waits for a frame.
Per-patient training runs as `deepnav fusion train` in its own process (deepnav.child_process).
Outputs, updated in place every frame:

- "MRUSFusion warped US": the US warped onto the MR (the 128 mm region around the liver), uint8;
- "MRUSFusion rigid": linear transform, the rigid stage (to parent: US onto MR);
- "MRUSFusion deformation": grid transform, the whole cascade in Slicer's from-parent convention.
  The live US node is placed under it (through "MRUSFusion initial alignment" when fiducials
  were used), so the full-resolution US is also shown on the MR.

SlicerDevelopmentToolbox is not used: see the README (section "Inside 3D Slicer").
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
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from deepnav import slicer_dependencies

WARPED = "MRUSFusion warped US"
RIGID = "MRUSFusion rigid"
DEFORMATION = "MRUSFusion deformation"
ALIGNMENT = "MRUSFusion initial alignment"
CONNECTOR = "MRUSFusion scanner"


class MRUSFusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MR-US Fusion")
        self.parent.categories = ["DeepNav"]
        self.parent.dependencies = []  # OpenIGTLinkIF is optional: only "Connect" needs it
        self.parent.contributors = ["DeepNav developers"]
        self.parent.helpText = _(
            "Registers each live 3D ultrasound volume to the preoperative MR with a rigid network "
            "cascaded with a B-spline network, and overlays the warped ultrasound on the MR. "
            "Select the MR (and its liver segmentation), the live US volume that the OpenIGTLink "
            "connector updates, optionally align with paired fiducials, and start. In service mode "
            "frames go to `deepnav fusion serve`, which must have been started with the same MR.")
        self.parent.acknowledgementText = _(
            "The shipped model was trained on synthetic patients only; see its model card.")


def ensure_dependencies() -> None:
    """torch (PyTorch extension), pyigtl and fastcrc: installed on first use, after asking, before
    any MRUSFusionLib import (Testing/test_slicer_dependencies.py holds the module to this)."""
    slicer_dependencies.ensure_dependencies("MRUSFusion", "MR-US Fusion")


@parameterNodeWrapper
class MRUSFusionParameterNode:
    mrVolume: slicer.vtkMRMLScalarVolumeNode
    liverSegmentation: slicer.vtkMRMLSegmentationNode
    modelPath: Path  # ctkPathLineEdit holds a Path; empty (Path()): the shipped model
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    usVolume: slicer.vtkMRMLScalarVolumeNode
    connectorHost: str = ""
    # int ranges as in the .ui: without them Slicer's connector resets the spin box to the int limits
    connectorPort: Annotated[int, WithinRange(1, 65535)] = 18944
    useService: bool = False
    serviceHost: str = "127.0.0.1"
    servicePort: Annotated[int, WithinRange(1, 65535)] = 18945
    mrFiducials: slicer.vtkMRMLMarkupsFiducialNode
    usFiducials: slicer.vtkMRMLMarkupsFiducialNode
    vesselSegmentation: slicer.vtkMRMLSegmentationNode
    trainingFolder: Path  # empty (Path()): not chosen yet
    rigidEpochs: Annotated[int, WithinRange(0, 200)] = 3
    bsplineEpochs: Annotated[int, WithinRange(0, 200)] = 6
    stepsPerEpoch: Annotated[int, WithinRange(1, 1000)] = 30
    fineTune: bool = True


class MRUSFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(500)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRUSFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MRUSFusionLogic()
        self.logic.onUpdate = self._showLiveStatus
        self.logic.onConnectorState = self._showConnectorState
        self.ui.liveButton.connect("toggled(bool)", self.onLiveToggled)
        self.ui.overlayButton.connect("clicked(bool)", self.onShowOverlay)
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.alignButton.connect("clicked(bool)", self.onAlign)
        self.ui.resetAlignmentButton.connect("clicked(bool)", self.onResetAlignment)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancelTraining)
        self._trainingTimer.connect("timeout()", self._pollTraining)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._trainingTimer.stop()
        self.logic.stopLive()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # live fusion keeps running while the user works in other modules
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.ui.liveButton.checked = False
        self.setParameterNode(None)

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
        p = self._parameterNode
        ready = bool(p and p.mrVolume and p.usVolume)
        self.ui.liveButton.enabled = ready or self.ui.liveButton.checked
        self.ui.liveButton.toolTip = "" if ready else _("Select the MR and the live US volume")
        self.ui.serviceHostLineEdit.enabled = self.ui.servicePortSpinBox.enabled = bool(p and p.useService)

    # -- live ------------------------------------------------------------------------------
    def onLiveToggled(self, on: bool) -> None:
        if not on:
            self.logic.stopLive()
            self.ui.liveButton.text = _("Start live fusion")
            return
        with slicer.util.tryWithErrorDisplay(_("Live fusion could not start."), waitCursor=True):
            try:
                self.logic.startLive(self._parameterNode)
            except Exception:
                self.ui.liveButton.checked = False
                raise
            self.ui.liveButton.text = _("Stop live fusion")

    def _showLiveStatus(self, stats: dict) -> None:
        latency = stats["latency_s"]
        quality = stats["quality"]
        lines = [
            _("Running on: {device}").format(device=stats["device"] or "..."),
            _("{done} frames fused, {dropped} dropped (latest frame only); {rate:.1f} frames/s; latency {latency}").format(
                done=stats["frames_completed"], dropped=stats["frames_dropped"], rate=stats["frame_rate_hz"],
                latency=f"{1000 * latency:.0f} ms" if latency is not None else "-"),
        ]
        if quality.get("stage") == "corrected":
            lines.append(_("Corrected: MIND-SSC {before:.3f} -> {after:.3f} (lower is better); {inliers:.0f}% inliers; "
                           "{disagreement:.1f} mm from the network; folding {folding:.3f}%").format(
                before=quality.get("mind_ssc_before", float("nan")), after=quality.get("mind_ssc_after", float("nan")),
                inliers=100 * quality.get("inlier_share", float("nan")),
                disagreement=quality.get("network_disagreement_mm", float("nan")),
                folding=quality.get("folding_percent", float("nan"))))
            if quality.get("flags"):
                lines.append(_("Check: {flags}").format(flags=", ".join(quality["flags"])))
        elif quality:
            lines.append(_("MIND distance {before:.3f} -> {after:.3f} (lower is better); folding {folding:.3f}%").format(
                before=quality.get("mind_before", float("nan")), after=quality.get("mind_after", float("nan")),
                folding=quality.get("folding_percent", float("nan"))))
        if stats["last_error"]:
            lines.append(_("Last frame not fused: {error}").format(error=stats["last_error"]))
        self.ui.liveStatusLabel.text = "\n".join(lines)

    def onShowOverlay(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot show the overlay.")):
            self.logic.showOverlay(self._parameterNode.mrVolume)

    def onConnect(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot start the OpenIGTLink connector."), waitCursor=True):
            self.logic.startConnector(self._parameterNode.connectorHost, self._parameterNode.connectorPort)

    def _showConnectorState(self, connected: bool, name: str) -> None:
        """Called by the logic on the connector's own Connected / Disconnected events (Start() only
        starts its thread: a client may still be trying, a server still waiting for its peer)."""
        if connected:
            self.ui.connectButton.text = _("Connected ({name})").format(name=name)
        else:
            self.ui.connectButton.text = _("Waiting for connection ({name}): click to restart").format(name=name)

    # -- alignment -------------------------------------------------------------------------
    def onAlign(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Alignment failed."), waitCursor=True):
            alignment = self.logic.computeAlignment(p.mrFiducials, p.usFiducials, p.usVolume)
            self.ui.alignmentLabel.text = _(
                "Aligned on {n} point pairs: RMS fiducial error {fre:.1f} mm (largest {worst:.1f} mm). "
                "Applied before the network to every frame.").format(
                n=len(alignment.residuals_mm), fre=alignment.fre_mm, worst=alignment.residuals_mm.max())

    def onResetAlignment(self) -> None:
        self.logic.resetAlignment(self._parameterNode.usVolume)
        self.ui.alignmentLabel.text = _("No initial alignment: the US is taken as it lies.")

    # -- training --------------------------------------------------------------------------
    def onTrain(self) -> None:
        usNodes = list(self.ui.recordedUsComboBox.checkedNodes())
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            self.logic.startTraining(self._parameterNode, usNodes)
            self.ui.trainButton.enabled = False
            self.ui.cancelTrainingButton.enabled = True
            self._trainingTimer.start()

    def onCancelTraining(self) -> None:
        self.logic.cancelTraining()

    def _pollTraining(self) -> None:
        task = self.logic.training
        self.ui.trainingProgressBar.value = int(100 * task.fraction)
        self.ui.trainingLabel.text = task.message
        if not task.done:
            return
        self._trainingTimer.stop()
        self.ui.trainButton.enabled, self.ui.cancelTrainingButton.enabled = True, False
        with slicer.util.tryWithErrorDisplay(_("Training stopped.")):
            try:
                path, info = self.logic.finishTraining()
            except Exception as exc:  # cancelled, bad input, or the worker process crashed / was killed
                self.ui.trainingLabel.text = _("Training stopped: {error}").format(error=exc)
                raise
            best = info["best"]
            self.ui.trainingLabel.text = _(
                "Saved {path}: best validation at epoch {epoch}, vessel Dice {dice:.3f}. "
                "It is now the selected model.").format(path=path, epoch=best["epoch"] + 1, dice=best["vessel_dice"])


class MRUSFusionLogic(ScriptedLoadableModuleLogic, VTKObservationMixin):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        VTKObservationMixin.__init__(self)
        self.live = None  # MRUSFusionLib.live.RemoteRegistration (or the local service's) while running
        self._liveWorkDir = None  # the MR handed to the local service process
        self.usNode = None
        self.alignment = None  # MRUSFusionLib.alignment.Alignment from the fiducials
        self.expectedGrid = None  # the fusion grid of the selected MR, to check a service's results
        self.lastResult = None
        self.training = None  # deepnav.child_process.ChildTask
        self._trainingParameters = self._trainingWorkDir = self._trainingOut = None
        self.onUpdate = None  # called with live statistics on every timer tick
        self.onConnectorState = None  # called with (connected, connector name) on the connector's events
        self._timer = qt.QTimer()
        self._timer.setInterval(50)
        self._timer.connect("timeout()", self.processResults)

    def getParameterNode(self):
        return MRUSFusionParameterNode(super().getParameterNode())

    @staticmethod
    def patientVolumes(mrNode, liverSegmentation):
        """The MR and (optional) liver mask as Volumes (LPS), copied out of their nodes."""
        from deepnav import mrml
        from deepnav.errors import InputError

        if mrNode is None:
            raise InputError("select the MR volume")
        mr = mrml.volume_from_node(mrNode)
        liver = mrml.labelmap_from_segmentation(liverSegmentation, mrNode) if liverSegmentation else None
        return mr, liver

    # -- initial alignment -------------------------------------------------------------------
    def computeAlignment(self, mrFiducials, usFiducials, usNode):
        """Rigid alignment from paired fiducials (US points read in the US volume's own frame),
        shown at once: the US node is put under the alignment transform."""
        from deepnav import mrml
        from deepnav.errors import InputError
        from MRUSFusionLib.alignment import rigid_from_fiducials
        from MRUSFusionLib.fields import resampling_to_parent_ras

        if usNode is None:
            raise InputError("select the US volume the fiducials were placed on")
        self.alignment = rigid_from_fiducials(mrml.points_from_markups(mrFiducials),
                                              mrml.points_from_markups(usFiducials, frame_of=usNode))
        mrml.linear_transform(slicer.mrmlScene, ALIGNMENT, resampling_to_parent_ras(self.alignment.matrix_lps))
        self._placeUS(usNode)
        return self.alignment

    def resetAlignment(self, usNode) -> None:
        self.alignment = None
        node = slicer.mrmlScene.GetFirstNodeByName(ALIGNMENT)
        if node is not None:
            slicer.mrmlScene.RemoveNode(node)
        if usNode is not None:
            self._placeUS(usNode)

    def _placeUS(self, usNode) -> None:
        """US -> [initial alignment] -> [deformation] -> world, whichever exist."""
        from deepnav import mrml

        scene = slicer.mrmlScene
        alignment = scene.GetFirstNodeByName(ALIGNMENT) if self.alignment is not None else None
        mrml.place_under(usNode, alignment, scene.GetFirstNodeByName(DEFORMATION))

    # -- live fusion -------------------------------------------------------------------------
    def startLive(self, parameters) -> None:
        """Register every new image of the live US node on a fusion service: one started here as
        a child process (`deepnav fusion serve` on a free loopback port, Slicer's Python), or one
        running elsewhere (service mode). Both are driven through the same client."""
        ensure_dependencies()
        import tempfile

        from deepnav import mrml
        from deepnav.errors import InputError
        from deepnav.imaging import write_volume
        from MRUSFusionLib.live import RemoteRegistration
        from MRUSFusionLib.preprocess import fusion_grid
        from MRUSFusionLib.service_process import LocalServiceRegistration

        self.stopLive()
        if parameters.usVolume is None:
            raise InputError("select the live US volume")
        mr, liver = self.patientVolumes(parameters.mrVolume, parameters.liverSegmentation)
        self.expectedGrid = fusion_grid(mr, liver)
        if parameters.useService:
            self.live = RemoteRegistration(parameters.serviceHost, parameters.servicePort)
        else:
            self._liveWorkDir = Path(tempfile.mkdtemp(prefix="deepnav-fusion-live-"))
            self.live = LocalServiceRegistration(
                write_volume(mr, self._liveWorkDir / "mr.nrrd"),
                write_volume(liver, self._liveWorkDir / "liver.nrrd") if liver is not None else None,
                model=mrml.chosen_path(parameters.modelPath), device=parameters.device,
                wait=lambda seconds: (slicer.app.processEvents(), time.sleep(seconds)))
        self.usNode = parameters.usVolume
        self.addObserver(self.usNode, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, self.onFrame)
        self._timer.start()
        if self.usNode.GetImageData() is not None:
            self.onFrame()  # the frame already there

    def stopLive(self) -> None:
        self._timer.stop()
        if self.usNode is not None:
            self.removeObserver(self.usNode, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, self.onFrame)
        if self.live is not None:
            self.live.close()
        if self._liveWorkDir is not None:
            import shutil

            shutil.rmtree(self._liveWorkDir, ignore_errors=True)
        self.live, self.usNode, self._liveWorkDir = None, None, None

    def onFrame(self, caller=None, event=None) -> None:
        """A new US image: copy it out of the node (VTK reuses the buffer) and hand it over."""
        from deepnav import mrml
        from deepnav.errors import InputError
        from MRUSFusionLib.alignment import prealign

        try:
            us = mrml.volume_from_node(self.usNode)
        except InputError as exc:
            self.live.last_error = str(exc)
            return
        if self.alignment is not None:
            us = prealign(us, self.alignment.matrix_lps)
        self.live.submit(us)

    def processResults(self) -> None:
        """Timer tick on the GUI thread: show the newest result, report the figures."""
        if self.live is None:
            return
        result = self.live.poll()
        if result is not None:
            # the network's results come on the MR's fusion grid; a corrected result (sent by default,
            # not by a service started with --fast) on the frame's registration region, which follows the US
            network_stage = result.report.get("stage", "network") == "network"
            if network_stage and self.expectedGrid is not None and not result.warped.same_grid(self.expectedGrid):
                self.live.last_error = ("the fusion service registers to another MR (or liver) than the one selected "
                                        "here: start it with the same MR")
            else:
                self.showResult(result)
        if self.onUpdate is not None:
            self.onUpdate(self.live.stats())

    def showResult(self, result) -> None:
        from deepnav import mrml

        scene = slicer.mrmlScene
        first = scene.GetFirstNodeByName(WARPED) is None
        warped = mrml.volume_node(scene, WARPED, result.warped)
        mrml.linear_transform(scene, RIGID, result.rigid_to_parent_ras)
        mrml.grid_transform_from_ras(scene, DEFORMATION, result.field_ras, result.field_grid)
        if first:
            warped.CreateDefaultDisplayNodes()
            display = warped.GetDisplayNode()
            if scene.GetNodeByID("vtkMRMLColorTableNodeIron") is not None:
                display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(0, 255)
            display.SetApplyThreshold(True)  # outside the US field of view (0) stays transparent
            display.SetLowerThreshold(1)
        if self.usNode is not None and self.usNode.GetParentTransformNode() is None:
            self._placeUS(self.usNode)
        self.lastResult = result

    def showOverlay(self, mrNode) -> None:
        """The warped US as a coloured, semi-transparent foreground over the MR, all slice views."""
        from deepnav.errors import InputError

        warped = slicer.mrmlScene.GetFirstNodeByName(WARPED)
        if warped is None:
            raise InputError("no frame has been fused yet: start live fusion first")
        slicer.util.setSliceViewerLayers(background=mrNode, foreground=warped, foregroundOpacity=0.5)

    # -- OpenIGTLink connector (SlicerOpenIGTLink's vtkMRMLIGTLConnectorNode) --------------------------
    def startConnector(self, host: str, port: int):
        """The module's one connector, created on first use and reused after (stopped, set to
        client of `host` or, without one, server on `port`, and started again). Start() only
        starts the connection thread: "connected" is reported from the node's ConnectedEvent
        (and its GetState()), and the first IMAGE it receives becomes the live US if none is
        selected (NewDeviceEvent, fired once the node for a new device is in the scene)."""
        if not hasattr(slicer, "vtkMRMLIGTLConnectorNode"):
            raise RuntimeError("Connecting needs the SlicerOpenIGTLink extension: install it from the Extensions Manager.")
        connector = slicer.mrmlScene.GetFirstNodeByName(CONNECTOR)
        if connector is None or not connector.IsA("vtkMRMLIGTLConnectorNode"):
            connector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLIGTLConnectorNode", CONNECTOR)
        connector.Stop()
        if host:
            connector.SetTypeClient(host, port)
        else:
            connector.SetTypeServer(port)
        # one method per event: VTK names these custom event ids "NoEvent" to a Python observer
        for event, method in ((connector.ConnectedEvent, self.reportConnectorState),
                              (connector.DisconnectedEvent, self.reportConnectorState),
                              (connector.NewDeviceEvent, self.adoptIncomingImage)):
            if not self.hasObserver(connector, event, method):
                self.addObserver(connector, event, method)
        if connector.Start() != 1:
            raise RuntimeError(f"cannot {'connect to ' + host + ':' if host else 'listen on port '}{port}")
        self.reportConnectorState(connector)  # the state now (normally still waiting)
        return connector

    def reportConnectorState(self, connector, event=None) -> None:
        if self.onConnectorState is not None:
            self.onConnectorState(connector.GetState() == connector.StateConnected, connector.GetName())

    def adoptIncomingImage(self, connector, event=None) -> None:
        """With no live US selected, the first scalar volume (an OpenIGTLink IMAGE of one
        component) the connector has brought in becomes it."""
        parameters = self.getParameterNode()
        if parameters.usVolume is not None:
            return
        for i in range(connector.GetNumberOfIncomingMRMLNodes()):
            node = connector.GetIncomingMRMLNode(i)
            if node is not None and node.GetClassName() == "vtkMRMLScalarVolumeNode":
                parameters.usVolume = node
                return

    # -- per-patient training ----------------------------------------------------------------
    @staticmethod
    def vesselSegmentationOf(usNode):
        """The segmentation drawn on this US volume (Segment Editor with it as source volume)."""
        for seg in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is usNode:
                return seg
        return None

    def startTraining(self, parameters, usNodes: list):
        """Copy the patient's volumes out of their nodes (GUI thread) into files, then train in
        `deepnav fusion train` as its own process (Slicer's Python): its progress lines drive
        `training`, Cancel ends it, a crash or kill comes back from `finishTraining`."""
        ensure_dependencies()  # the child process uses the same Python packages
        import tempfile

        from deepnav import mrml
        from deepnav.child_process import ChildTask, child_environment, deepnav_command
        from deepnav.errors import InputError
        from deepnav.imaging import write_volume
        from MRUSFusionLib.alignment import prealign
        from MRUSFusionLib.model_io import SHIPPED_MODEL

        if self.training is not None and not self.training.done:
            raise InputError("a training is already running")
        if parameters.vesselSegmentation is None:
            raise InputError("select the MR vessel segmentation")
        if len(usNodes) < 2:
            raise InputError("check at least 2 recorded US volumes (8 over a breathing cycle is typical)")
        out = mrml.chosen_path(parameters.trainingFolder)
        if out is None:
            raise InputError("choose an output folder for the model and its checkpoints")
        mr, liver = self.patientVolumes(parameters.mrVolume, parameters.liverSegmentation)
        vessels = mrml.labelmap_from_segmentation(parameters.vesselSegmentation, parameters.mrVolume)
        work = Path(tempfile.mkdtemp(prefix="deepnav-fusion-training-"))
        images, labels = [], []
        for k, usNode in enumerate(usNodes):
            segmentation = self.vesselSegmentationOf(usNode)
            if segmentation is None:
                raise InputError(f"{usNode.GetName()} has no vessel segmentation: draw one in Segment Editor "
                                 "with it as the source volume")
            image, label = mrml.volume_from_node(usNode), mrml.labelmap_from_segmentation(segmentation, usNode)
            if self.alignment is not None:
                image, label = prealign(image, self.alignment.matrix_lps), prealign(label, self.alignment.matrix_lps)
            images.append(str(write_volume(image, work / f"us_{k:02d}.nrrd")))
            labels.append(str(write_volume(label, work / f"us_vessels_{k:02d}.nrrd")))
        args = ["fusion", "train", "--mr", str(write_volume(mr, work / "mr.nrrd")),
                "--mr-vessels", str(write_volume(vessels, work / "mr_vessels.nrrd")),
                "--us", *images, "--us-vessels", *labels, "--val-frames", str(max(1, len(usNodes) // 4)),
                "--rigid-epochs", str(parameters.rigidEpochs), "--bspline-epochs", str(parameters.bsplineEpochs),
                "--steps-per-epoch", str(parameters.stepsPerEpoch), "--device", parameters.device, "--out", str(out)]
        if liver is not None:
            args += ["--liver", str(write_volume(liver, work / "liver.nrrd"))]
        if parameters.fineTune:
            args += ["--init", str(mrml.chosen_path(parameters.modelPath) or SHIPPED_MODEL)]
        self._trainingParameters, self._trainingWorkDir, self._trainingOut = parameters, work, out
        self.training = ChildTask(deepnav_command(*args), env=child_environment("MRUSFusionLib"))
        return self.training

    def cancelTraining(self) -> None:
        if self.training is not None:
            self.training.cancel()

    def finishTraining(self):
        """The finished training's (model path, history); the new model becomes the selected one.
        Raises what stopped it (Cancelled, bad input, the worker process crashed or was killed)."""
        import json
        import shutil

        try:
            self.training.result()
        finally:
            shutil.rmtree(self._trainingWorkDir, ignore_errors=True)
        path = self._trainingOut / "model.pt"
        info = json.loads((self._trainingOut / "history.json").read_text())
        self._trainingParameters.modelPath = path
        return path, info


class MRUSFusionTest(ScriptedLoadableModuleTest):
    """Inside Slicer, on the built-in synthetic patient: a US volume 13 mm and 8 degrees off is
    aligned from four fiducial pairs, fused live by the local fusion service process, and the US
    node, under the output transforms, lies on the MR landmarks within the registration's accuracy."""

    def setUp(self):
        ensure_dependencies()
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_live_fusion_on_the_synthetic_patient()

    def _waitFor(self, condition, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for a fused frame")
            slicer.app.processEvents()
            time.sleep(0.02)

    def test_live_fusion_on_the_synthetic_patient(self):
        import numpy as np

        from deepnav import mrml
        from deepnav.imaging import rotation_matrix
        from MRUSFusionLib.alignment import prealign
        from MRUSFusionLib.demo import DEMO_PATIENT_SEED
        from MRUSFusionLib.phantom import make_patient

        self.delayDisplay("Generating the synthetic patient")
        patient = make_patient(DEMO_PATIENT_SEED, frames=2)
        scene = slicer.mrmlScene
        mrNode = mrml.volume_node(scene, "MR", patient.mr)
        liverLabel = mrml.volume_node(scene, "liver label", patient.liver, "vtkMRMLLabelMapVolumeNode")
        liverSegmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "liver")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(liverLabel, liverSegmentation)
        off = np.eye(4)
        off[:3, :3] = rotation_matrix(np.deg2rad([0.0, 8.0, 0.0]))
        off[:3, 3] = [12.0, 0.0, -5.0]
        back = np.linalg.inv(off)
        usNode = mrml.volume_node(scene, "US", prealign(patient.frames[0].image, off))
        usLandmarks = patient.frames[0].landmarks_lps @ back[:3, :3].T + back[:3, 3]

        flip = np.array([-1.0, -1.0, 1.0])
        mrPoints = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MR points")
        usPoints = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "US points")
        slicer.util.updateMarkupsControlPointsFromArray(mrPoints, patient.landmarks_lps[:4] * flip)
        slicer.util.updateMarkupsControlPointsFromArray(usPoints, usLandmarks[:4] * flip)

        logic = MRUSFusionLogic()
        parameters = logic.getParameterNode()
        parameters.mrVolume, parameters.liverSegmentation, parameters.usVolume = mrNode, liverSegmentation, usNode
        parameters.device = "cpu"
        alignment = logic.computeAlignment(mrPoints, usPoints, usNode)
        self.assertLess(alignment.fre_mm, 3.0)

        self.delayDisplay("Live fusion in a fusion service process")
        logic.startLive(parameters)
        try:
            self._waitFor(lambda: logic.lastResult is not None)
            first = logic.lastResult
            mrml.update_node_from_volume(usNode, prealign(patient.frames[1].image, off))  # the next frame arrives
            self._waitFor(lambda: logic.lastResult is not first)
            stats = logic.live.stats()
        finally:
            logic.stopLive()
        self.assertGreaterEqual(stats["frames_completed"], 2)

        # frame 1 is shown: MR landmarks, taken into the US node's own frame through its transforms
        usLandmarks = patient.frames[1].landmarks_lps @ back[:3, :3].T + back[:3, 3]
        worldToUs = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, usNode.GetParentTransformNode(), worldToUs)
        grid = logic.lastResult.warped
        inside = np.all(np.abs(grid.lps_to_index(patient.landmarks_lps) - 63.5) < 60, axis=1)
        mapped = np.array([worldToUs.TransformPoint((p * flip).tolist()) for p in patient.landmarks_lps[inside]]) * flip
        before = np.median(np.linalg.norm(patient.landmarks_lps[inside] - usLandmarks[inside], axis=1))
        after = np.median(np.linalg.norm(mapped - usLandmarks[inside], axis=1))
        self.delayDisplay(f"Median landmark error {before:.1f} mm as received, {after:.1f} mm fused")
        self.assertGreater(before, 10.0)
        self.assertLess(after, 8.0)  # the shipped model's median TRE is ~6.6 mm (model card)
        self.assertIs(usNode.GetParentTransformNode(), scene.GetFirstNodeByName(ALIGNMENT))
        self.assertIs(scene.GetFirstNodeByName(ALIGNMENT).GetParentTransformNode(), scene.GetFirstNodeByName(DEFORMATION))
        logging.info("MRUSFusionTest passed")


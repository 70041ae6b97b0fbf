"""The module's parameter node: typed GUI state, saved with the scene (needs the Slicer application).

Widgets in Resources/UI/KPrismSlicer.ui carry a ``SlicerParameterName`` property naming the field
they edit; ``connectGui`` keeps both in step.
"""

from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, Default, parameterNodeWrapper

# Classes of non-core modules come from their own Python modules, not from the `slicer` namespace.
from vtkSlicerMarkupsModuleMRMLPython import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode
from vtkSlicerSegmentationsModuleMRMLPython import vtkMRMLSegmentationNode

DEVICES = ["auto", "cpu", "cuda", "mps"]
MODALITIES = ["auto", "ct", "mri", "x-ray", "ultrasound", "pet", "microscopy", "unknown"]
AXES = ["axial", "coronal", "sagittal"]


@parameterNodeWrapper
class KPrismSlicerParameterNode:
    """
    inputVolume, outputSegmentation - what to segment and where the segments go.
    classFilter - text typed in the semantic panel's search box.
    referenceVolume - the in-context example volume (its segment is picked in the panel).
    positivePoints, negativePoints, box - interactive prompts placed in the views.
    device, modality, axis - how the model runs; the model name is kept in `model`.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    classFilter: str
    referenceVolume: vtkMRMLScalarVolumeNode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    box: vtkMRMLMarkupsROINode
    device: Annotated[str, Choice(DEVICES), Default("auto")]
    modality: Annotated[str, Choice(MODALITIES), Default("auto")]
    axis: Annotated[str, Choice(AXES), Default("axial")]
    model: str

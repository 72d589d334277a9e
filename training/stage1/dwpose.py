"""DWPose from user-supplied ONNX files (the paper's pose estimator for RPIM), via onnxruntime.

Two files, as DWPose ships them: the YOLOX-L person detector (`yolox_l.onnx`, 640x640 input, BGR
0..255, letterboxed with 114) and the whole-body RTMPose model (`dw-ll_ucoco_384.onnx`, 288x384 input,
BGR normalised by mean (123.675, 116.28, 103.53) / std (58.395, 57.12, 57.375), SimCC outputs with
split ratio 2). The pre/post-processing follows DWPose's own `onnxdet.py` / `onnxpose.py` (numpy
instead of cv2): the highest-scoring person box (class 0, score > 0.3 after NMS 0.45) is padded by
1.25, warped to the pose input, and the 133 COCO-WholeBody keypoints are decoded and mapped onto our
canonical 66 keypoints (OpenPose-18 body with the neck as the shoulders' mean, 6 foot points, 2x21
hand points) plus the 68 face points, then drawn by the loader's renderer (`dataset/posemap.py`) so
the map matches the training pose maps (the face points are not drawn: the training maps have none). Keypoints with score <= 0.3 are not drawn (DWPose's threshold).

Optional: `pip install onnxruntime` (the `faces` extra). No weights are bundled or downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from serialgen.errors import UserInputError

__all__ = ["DWPoseOnnx", "wholebody_to_canonical"]

_SCORE = 0.3
# COCO-17 body order -> OpenPose-18 (index 1 = neck, computed): OpenPose i takes COCO _COCO_OF_OPENPOSE[i]
_COCO_OF_OPENPOSE = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]


def wholebody_to_canonical(keypoints: np.ndarray, scores: np.ndarray, size: tuple[int, int]):
    """(133, 2) COCO-WholeBody keypoints + (133,) scores -> `dataset.posemap.Pose` (66 canonical + face)."""
    from serialgen.dataset.posemap import Pose

    xy = np.zeros((66, 2), np.float32)
    vis = np.zeros(66, bool)
    for i, coco in enumerate(_COCO_OF_OPENPOSE):
        if coco is None:  # neck: mean of the shoulders, visible when both are
            xy[i] = keypoints[[5, 6]].mean(0)
            vis[i] = scores[5] > _SCORE and scores[6] > _SCORE
        else:
            xy[i], vis[i] = keypoints[coco], scores[coco] > _SCORE
    xy[18:24], vis[18:24] = keypoints[17:23], scores[17:23] > _SCORE  # feet, same order as ours
    xy[24:66], vis[24:66] = keypoints[91:133], scores[91:133] > _SCORE  # left then right hand
    face = keypoints[23:91][scores[23:91] > _SCORE].astype(np.float32)
    w, h = size
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    return Pose(xy, vis & inside, (int(w), int(h)), face.reshape(-1, 2))


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.maximum(0, xx2 - xx1 + 1) * np.maximum(0, yy2 - yy1 + 1)
        area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        iou = inter / (area[i] + area[order[1:]] - inter)
        order = order[1:][iou <= threshold]
    return keep


def _warp(image: np.ndarray, center: np.ndarray, scale: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Crop the box (center, scale) of `image` to out_w x out_h, bilinear (DWPose's warpAffine, rot 0)."""
    x0, y0 = center - scale / 2
    x1, y1 = center + scale / 2
    # PIL's EXTENT transform maps the output rectangle onto (x0, y0, x1, y1) of the input; outside is black
    return np.asarray(Image.fromarray(image).transform((out_w, out_h), Image.Transform.EXTENT,
                                                       (float(x0), float(y0), float(x1), float(y1)),
                                                       resample=Image.Resampling.BILINEAR))


class DWPoseOnnx:
    """(H, W, 3) uint8 RGB -> (3, H, W) float pose map in [0, 1] (black when no person is found)."""

    def __init__(self, det_path: str | Path, pose_path: str | Path, providers: list[str] | None = None):
        for flag, path, name in (("--dwpose-det", det_path, "yolox_l.onnx"), ("--dwpose-pose", pose_path, "dw-ll_ucoco_384.onnx")):
            if not Path(path).is_file():
                raise UserInputError(f"{flag} {path} not found: expected the DWPose ONNX file {name}")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserInputError("DWPose needs onnxruntime: pip install onnxruntime (or the 'faces' extra)") from None
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                  if p in ort.get_available_providers()]
        self.det = ort.InferenceSession(str(det_path), providers=providers)
        self.pose = ort.InferenceSession(str(pose_path), providers=providers)
        _, _, self.pose_h, self.pose_w = self.pose.get_inputs()[0].shape

    def _detect(self, bgr: np.ndarray) -> np.ndarray | None:
        size = 640
        h, w = bgr.shape[:2]
        r = min(size / h, size / w)
        # YOLOX's own input: top-left aligned on grey 114 (not serialgen.imaging.letterbox, which centres
        # on white); the box decoding below assumes no offset.
        padded = np.full((size, size, 3), 114, np.uint8)
        padded[: int(h * r), : int(w * r)] = np.asarray(Image.fromarray(bgr).resize((int(w * r), int(h * r)), Image.Resampling.BILINEAR))
        out = self.det.run(None, {self.det.get_inputs()[0].name: padded.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
        grids, strides = [], []
        for stride in (8, 16, 32):
            gy, gx = np.meshgrid(np.arange(size // stride), np.arange(size // stride), indexing="ij")
            grids.append(np.stack([gx, gy], -1).reshape(-1, 2))
            strides.append(np.full((grids[-1].shape[0], 1), stride))
        grid, stride = np.concatenate(grids), np.concatenate(strides)
        centers = (out[:, :2] + grid) * stride
        wh = np.exp(out[:, 2:4]) * stride
        boxes = np.concatenate([centers - wh / 2, centers + wh / 2], 1) / r
        scores = out[:, 4] * out[:, 5]  # objectness x person class
        keep = scores > 0.1
        if not keep.any():
            return None
        boxes, scores = boxes[keep], scores[keep]
        kept = [i for i in _nms(boxes, scores, 0.45) if scores[i] > _SCORE]
        return boxes[kept[0]] if kept else None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        from serialgen.dataset.posemap import draw_pose_map

        h, w = image.shape[:2]
        bgr = np.ascontiguousarray(image[..., ::-1])
        box = self._detect(bgr)
        if box is None:
            return torch.zeros(3, h, w)
        center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        scale = np.array([box[2] - box[0], box[3] - box[1]]) * 1.25
        aspect = self.pose_w / self.pose_h
        scale = np.array([scale[0], scale[0] / aspect]) if scale[0] > scale[1] * aspect else np.array([scale[1] * aspect, scale[1]])
        crop = _warp(bgr, center, scale, self.pose_w, self.pose_h).astype(np.float32)
        crop = (crop - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
        simcc_x, simcc_y = self.pose.run(None, {self.pose.get_inputs()[0].name: crop.transpose(2, 0, 1)[None].astype(np.float32)})
        locs = np.stack([simcc_x[0].argmax(-1), simcc_y[0].argmax(-1)], -1).astype(np.float32) / 2.0  # split ratio 2
        scores = np.minimum(simcc_x[0].max(-1), simcc_y[0].max(-1))
        keypoints = locs / np.array([self.pose_w, self.pose_h]) * scale + center - scale / 2
        pose = wholebody_to_canonical(keypoints, scores, (w, h))
        # Drawn without the 68 face points: the training maps (rendered keypoints, the estimator's
        # annotations) have none, and Stage I must see at inference the kind of map it trained on.
        pose.face = np.zeros((0, 2), np.float32)
        return torch.from_numpy(draw_pose_map(pose, (w, h)).astype(np.float32) / 255.0).permute(2, 0, 1)

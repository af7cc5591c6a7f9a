"""Model zoo built from tilefuse modules (randomly initialised; no downloads).

Each constructor takes ``fused=True`` (patch into tilefuse modules; ``False`` gives the plain torch
reference with identical ``state_dict`` keys) and a width knob for small test models."""
from tilefuse.models._common import load_state_dict_from  # noqa: F401
from tilefuse.models.cuda_graph import (CUDAGraphInference, cuda_graph_inference,  # noqa: F401
                                        prepare_inference)
from tilefuse.models.inception import (GoogLeNetSmall, InceptionBlock,  # noqa: F401
                                       googlenet_small, inception_block)
from tilefuse.models.mobile import (EfficientNet, MobileNetV2, efficientnet_b0,  # noqa: F401
                                    efficientnet_b1, efficientnet_b2, efficientnet_b3,
                                    mobilenet_v2)
from tilefuse.models.resnet import (ResNet, resnet18, resnet34, resnet50, resnet101,  # noqa: F401
                                    resnet152)
from tilefuse.models.text import TextClassifier, int8_size_mb, text_classifier  # noqa: F401


_REGISTRY = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
    "resnet152": resnet152, "mobilenet_v2": mobilenet_v2, "efficientnet_b0": efficientnet_b0,
    "efficientnet_b1": efficientnet_b1, "efficientnet_b2": efficientnet_b2,
    "efficientnet_b3": efficientnet_b3, "googlenet_small": googlenet_small,
    "inception_block": inception_block, "text_classifier": text_classifier,
    "textcls": text_classifier,
}


def get(name: str, **kwargs):
    """Build a model by name (``names()`` lists them); ``kwargs`` go to its constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def names():
    return sorted(_REGISTRY)

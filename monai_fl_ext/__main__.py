from monai_fl_ext.cli import main

raise SystemExit(main())

from omniseg.cli import main

raise SystemExit(main())
